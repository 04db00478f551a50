"""Incremental runs: which listed images the committed tables already hold, and which are gone.

An image is identified by its URI and versioned by ``(file_size, source_version)``, where the
version is the store's ETag or the file's mtime. A run embeds only images whose key is not in
the current table; a changed image gets a new row in the new run, and readers keep the latest
row per URI (:func:`resolve_current`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.listing import ListingCounts, list_images
from pipeline.manifest import Failures, count_failures, failures_by_type

# Failed images are retried only when the failure may be transient.
RETRIED_ERROR_TYPES = frozenset({"unreadable"})

# Listing rows per object-store chunk: ten million keys stay some 40,000 refs in the driver.
# The plan re-splits the chunks into decode-sized blocks before decoding.
LISTING_BLOCK_ROWS = 256

# The committed columns the diff needs, per table.
EMBEDDINGS_KEY_COLUMNS = ["uri", "file_size", "source_version"]
ERRORS_KEY_COLUMNS = ["uri", "file_size", "source_version", "error_type", "error_message"]
_KEY_SCHEMA = pa.schema(
    [("uri", pa.string()), ("file_size", pa.int64()), ("source_version", pa.string())]
)
NO_EMBEDDINGS = _KEY_SCHEMA.empty_table()
NO_ERRORS = pa.schema(
    [*_KEY_SCHEMA, pa.field("error_type", pa.string()), pa.field("error_message", pa.string())]
).empty_table()


@dataclasses.dataclass
class NewImages:
    """What a run has to embed: listing chunks in the object store, and the books on the rest."""

    refs: list[Any]
    counts: ListingCounts
    unchanged: int
    known_failures: dict[str, Failures]
    deleted: pa.Array
    complete: bool = True  # False: stopped at max_listed, the rest not listed

    @property
    def known_failed(self) -> int:
        return count_failures(self.known_failures)

    @property
    def to_embed(self) -> int:
        return self.counts.listed - self.unchanged - self.known_failed


def list_new_images(
    fs: Any,
    root: str,
    *,
    committed: tuple[pa.Table, pa.Table] | None,
    keep: Callable[[pa.Table], Any] | None,
    limit: int | None = None,
    max_listed: int | None = None,
) -> NewImages:
    """List the input and keep what the committed tables do not already hold.

    Each kept chunk goes to the object store as it is listed, so the driver holds one chunk of
    the listing at a time, plus the current table's keys when there is one.

    Args:
        fs: The input's filesystem.
        root: The input's path on it.
        committed: The current embeddings (``EMBEDDINGS_KEY_COLUMNS``) and errors
            (``ERRORS_KEY_COLUMNS``) rows, or ``None`` to embed everything (``--full``, or a
            new output).
        keep: Where each chunk of new images goes as it is listed (``ray.put``: the run's
            refs); ``None`` counts them only (a dry run).
        limit: List at most this many images; a limited listing records no deletions.
        max_listed: Give up once this many images are listed and more may follow
            (``complete`` is then False).
    """
    counts = ListingCounts()
    known = CommittedImages(*(committed or (NO_EMBEDDINGS, NO_ERRORS)))
    current_uris = known.uris
    seen = np.zeros(len(current_uris), dtype=bool)
    refs, unchanged, failed_rows, complete = [], 0, [], True
    for chunk in list_images(fs, root, counts, chunk_rows=LISTING_BLOCK_ROWS, limit=limit):
        if max_listed is not None and counts.listed > max_listed:
            complete = False
            break
        mark_seen(seen, current_uris, chunk)
        diff = known.diff(chunk)
        unchanged += diff.unchanged
        failed_rows.append(diff.known_failed_rows)
        if diff.new.num_rows and keep is not None:
            refs.append(keep(diff.new))
    # Only a complete listing can tell that an image is gone.
    full_listing = limit is None and complete
    deleted = current_uris.filter(pa.array(~seen)) if full_listing else current_uris[:0]
    return NewImages(
        refs=refs,
        counts=counts,
        unchanged=unchanged,
        known_failures=known.failures(np.concatenate([np.zeros(0, np.int64), *failed_rows])),
        deleted=deleted,
        complete=complete,
    )


@dataclasses.dataclass(frozen=True)
class ChunkDiff:
    new: pa.Table
    unchanged: int
    known_failed_rows: np.ndarray  # rows of CommittedImages.lasting


class CommittedImages:
    """The committed images a run need not embed again, keyed once per run.

    Embedded images and images that failed for a lasting reason (everything but
    ``RETRIED_ERROR_TYPES``) are known; a listed image whose key is among them is skipped.

    Example:
        >>> known = CommittedImages(embeddings, errors)  # doctest: +SKIP
        >>> known.diff(listing_chunk).new  # doctest: +SKIP
    """

    def __init__(self, embeddings: pa.Table, errors: pa.Table) -> None:
        self.lasting = errors.filter(
            pc.invert(pc.is_in(errors["error_type"], pa.array(sorted(RETRIED_ERROR_TYPES))))
        )
        self.n_embedded = embeddings.num_rows
        # Embedded keys first, then the lasting failures': one lookup tells which it is.
        parts = [
            pa.chunked_array(image_keys(t)).combine_chunks()
            for t in (embeddings, self.lasting)
            if t.num_rows
        ]
        self.keys = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
        self.uris = pa.concat_arrays(
            [t["uri"].combine_chunks().cast(pa.string()) for t in (embeddings, errors)]
        )

    def diff(self, chunk: pa.Table) -> ChunkDiff:
        """Split a listing chunk: new or changed rows, unchanged ones, known failures."""
        if len(self.keys) == 0 or chunk.num_rows == 0:
            return ChunkDiff(chunk, 0, np.zeros(0, np.int64))
        found = pc.index_in(image_keys(chunk), value_set=self.keys)
        matched = found.drop_null().to_numpy(zero_copy_only=False)
        return ChunkDiff(
            new=chunk.filter(pc.is_null(found)),
            unchanged=int((matched < self.n_embedded).sum()),
            known_failed_rows=matched[matched >= self.n_embedded] - self.n_embedded,
        )

    def failures(self, rows: np.ndarray) -> dict[str, Failures]:
        """Known failures by ``error_type``, with a count and one example URI each."""
        rows_array = pa.array(rows, pa.int64())
        return failures_by_type(
            *(
                self.lasting[column].take(rows_array).to_numpy(zero_copy_only=False)
                if column in self.lasting.column_names
                else [""] * len(rows)
                for column in ("error_type", "uri", "error_message")
            )
        )


def image_keys(table: pa.Table) -> pa.Array:
    """``uri \\0 file_size \\0 source_version`` per row: equal keys mean the same bytes."""
    return pc.binary_join_element_wise(
        table["uri"],
        pc.cast(table["file_size"], pa.string()),
        table["source_version"],
        "\x00",
    )


def resolve_current(
    embeddings: pa.Table, errors: pa.Table, deletions: pa.Table
) -> tuple[pa.Table, pa.Table]:
    """Keep, per URI, only its latest row across both tables, and drop URIs deleted since.

    Args:
        embeddings: Rows with at least ``uri`` and ``run_id``.
        errors: Likewise.
        deletions: ``uri`` and ``run_id`` of images found gone in that run.

    Returns:
        The current embeddings and errors rows. Run ids sort in time order, so "latest" is the
        greatest ``run_id``; a deletion removes a URI whose latest row is older than it.
    """
    n_emb = embeddings.num_rows
    narrow = pa.concat_tables(
        [
            pa.table(
                {
                    "uri": embeddings["uri"].cast(pa.string()),
                    "run_id": embeddings["run_id"].cast(pa.string()),
                }
            ),
            pa.table(
                {
                    "uri": errors["uri"].cast(pa.string()),
                    "run_id": errors["run_id"].cast(pa.string()),
                }
            ),
        ]
    )
    if narrow.num_rows == 0:
        return embeddings, errors
    order = pc.sort_indices(narrow, [("uri", "ascending"), ("run_id", "descending")]).to_numpy()
    uris = narrow["uri"].take(order)
    first = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        first[1:] = pc.not_equal(uris[1:], uris[:-1]).to_numpy(zero_copy_only=False)
    keep = order[first]
    if deletions.num_rows:
        latest = narrow.take(keep)
        gone = deletions.group_by("uri").aggregate([("run_id", "max")])
        joined = latest.append_column("row", pa.array(keep)).join(
            gone, keys="uri", join_type="left outer"
        )
        alive = pc.or_kleene(
            pc.is_null(joined["run_id_max"]),
            pc.greater(joined["run_id"], joined["run_id_max"]),
        )
        keep = np.sort(joined.filter(pc.fill_null(alive, True))["row"].to_numpy())
    keep = np.sort(keep)
    return embeddings.take(keep[keep < n_emb]), errors.take(keep[keep >= n_emb] - n_emb)


def mark_seen(seen: np.ndarray, current_uris: pa.Array, chunk: pa.Table) -> None:
    """Set ``seen[i]`` for every current URI ``i`` that this listing chunk holds."""
    if len(current_uris) == 0 or chunk.num_rows == 0:
        return
    found = pc.index_in(chunk["uri"], value_set=current_uris).drop_null()
    seen[found.to_numpy(zero_copy_only=False)] = True
