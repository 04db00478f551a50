"""Incremental runs: which listed images the committed tables already hold, and which are gone.

An image is identified by its URI and versioned by ``(file_size, source_version)``, where the
version is the store's ETag or the file's mtime. A run embeds only images whose key is not in
the current table; a changed image gets a new row in the new run, and readers keep the latest
row per URI (:func:`resolve_current`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
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
    concurrency: int = 1,
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
        concurrency: LIST requests in flight at once, on object stores.
    """
    counts = ListingCounts()
    chunks = list_images(
        fs, root, counts, chunk_rows=LISTING_BLOCK_ROWS, limit=limit, concurrency=concurrency
    )
    return diff_listing(
        chunks,
        counts,
        committed=committed,
        keep=keep,
        limited=limit is not None,
        max_listed=max_listed,
    )


def diff_listing(
    chunks: Iterable[pa.Table],
    counts: ListingCounts,
    *,
    committed: tuple[pa.Table, pa.Table] | None,
    keep: Callable[[pa.Table], Any] | None,
    limited: bool = False,
    max_listed: int | None = None,
) -> NewImages:
    """Diff listing chunks, as they come, against the committed tables (see
    :func:`list_new_images`); ``counts`` is the lister's, read as it goes.

    Each chunk costs time in proportion to its own rows: the committed keys are indexed
    once (:class:`CommittedImages`). ``keep``'s non-``None`` results become ``refs``.
    """
    known = CommittedImages(*(committed or (NO_EMBEDDINGS, NO_ERRORS)))
    refs, unchanged, failed_rows, complete = [], 0, [], True
    for chunk in chunks:
        if max_listed is not None and counts.listed > max_listed:
            complete = False
            break
        diff = known.diff(chunk)
        unchanged += diff.unchanged
        if len(diff.known_failed_rows):
            failed_rows.append(diff.known_failed_rows)
        if diff.new.num_rows and keep is not None:
            kept = keep(diff.new)
            if kept is not None:
                refs.append(kept)
    # Only a complete listing can tell that an image is gone.
    full_listing = not limited and complete
    deleted = known.unseen() if full_listing else pa.array([], pa.large_string())
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


class KeyIndex:
    """Rows of a table found by their key columns: each key hashed once, looked up per batch.

    The table's keys are hashed to 64 bits once and sorted; a batch of ``n`` probes costs
    ``O(n log N)``, never a rebuild over the ``N`` indexed rows. A hash match is checked
    against the indexed row's columns, so a collision can only make a key look absent (for
    the diff: embedded again), never make an absent key look present. The driver holds 16
    bytes per indexed key beside the table itself.

    Example:
        >>> index = KeyIndex(pa.table({"uri": ["a", "b"], "n": [1, 2]}), ["uri", "n"])
        >>> index.find(pa.table({"uri": ["b", "a", "c"], "n": [2, 9, 1]})).tolist()
        [1, -1, -1]
    """

    def __init__(self, table: pa.Table, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        # One chunk per column: a take from a many-chunked column costs the whole column.
        self.table = table.select(self.columns).combine_chunks()
        hashes = hash_keys(self.table, self.columns)
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]

    def __len__(self) -> int:
        return len(self.sorted)

    def find(self, probe: pa.Table) -> np.ndarray:
        """The indexed row of each probe row's key, or -1 where it has none."""
        if len(self.sorted) == 0 or probe.num_rows == 0:
            return np.full(probe.num_rows, -1, np.int64)
        hashes = hash_keys(probe, self.columns)
        at = np.minimum(np.searchsorted(self.sorted, hashes), len(self.sorted) - 1)
        rows = np.where(self.sorted[at] == hashes, self.order[at], -1).astype(np.int64)
        candidates = np.flatnonzero(rows >= 0)
        if candidates.size:
            same = np.ones(candidates.size, dtype=bool)
            taken = pa.array(rows[candidates])
            probed = pa.array(candidates)
            for column in self.columns:
                ours = self.table[column].take(taken)
                theirs = probe[column].take(probed).cast(ours.type)
                same &= pc.fill_null(pc.equal(ours, theirs), False).to_numpy(zero_copy_only=False)
            rows[candidates[~same]] = -1
        return rows


# Rows hashed per step: bounds the Python strings that exist at once while hashing.
_HASH_SLICE = 1 << 20


def hash_keys(table: pa.Table, columns: Sequence[str]) -> np.ndarray:
    """A uint64 hash of each row's ``columns`` (SipHash, through pandas, slice by slice).

    Equal values hash equally whatever their Arrow type (``string`` or ``large_string``,
    any integer width): the columns are joined as text.
    """
    from pandas.util import hash_array

    out = np.empty(table.num_rows, dtype=np.uint64)
    for start in range(0, table.num_rows, _HASH_SLICE):
        part = table.slice(start, _HASH_SLICE)
        key = pc.binary_join_element_wise(
            *(pc.cast(part[c], pa.large_string()) for c in columns),
            pa.scalar("\x00", pa.large_string()),
        )
        out[start : start + part.num_rows] = hash_array(
            key.to_numpy(zero_copy_only=False), categorize=False
        )
    return out


class CommittedImages:
    """The committed images a run need not embed again, indexed once per run.

    Embedded images and images that failed for a lasting reason (everything but
    ``RETRIED_ERROR_TYPES``) are known; a listed image whose key is among them is skipped.
    Every current URI is indexed too, so that a complete listing can tell which are gone.
    Each listed image costs two hashes and two binary searches (:class:`KeyIndex`), whatever
    the size of the committed table.

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
        # large_string: past some 19 million URIs a string column's offsets overflow.
        self.keys = KeyIndex(
            pa.concat_tables(
                [_key_columns(t, EMBEDDINGS_KEY_COLUMNS) for t in (embeddings, self.lasting)]
            ),
            EMBEDDINGS_KEY_COLUMNS,
        )
        self.current = KeyIndex(
            pa.concat_tables([_key_columns(t, ["uri"]) for t in (embeddings, errors)]), ["uri"]
        )
        self.seen = np.zeros(len(self.current), dtype=bool)

    def diff(self, chunk: pa.Table) -> ChunkDiff:
        """Split a listing chunk into new or changed rows, unchanged ones and known failures;
        mark the current URIs it holds as seen."""
        if chunk.num_rows == 0:
            return ChunkDiff(chunk, 0, np.zeros(0, np.int64))
        seen = self.current.find(chunk)
        self.seen[seen[seen >= 0]] = True
        found = self.keys.find(chunk)
        matched = found[found >= 0]
        return ChunkDiff(
            new=chunk.filter(pa.array(found < 0)),
            unchanged=int((matched < self.n_embedded).sum()),
            known_failed_rows=matched[matched >= self.n_embedded] - self.n_embedded,
        )

    def unseen(self) -> pa.Array:
        """Current URIs no chunk held: gone from the input, if the listing was complete."""
        uris = self.current.table["uri"]
        return uris.filter(pa.array(~self.seen)).combine_chunks()

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


_KEY_TYPES = {
    "uri": pa.large_string(),
    "file_size": pa.int64(),
    "source_version": pa.large_string(),
}


def _key_columns(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    return pa.table({c: table[c].cast(_KEY_TYPES[c]) for c in columns})


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
                    "uri": embeddings["uri"].cast(pa.large_string()),
                    "run_id": embeddings["run_id"].cast(pa.large_string()),
                }
            ),
            pa.table(
                {
                    "uri": errors["uri"].cast(pa.large_string()),
                    "run_id": errors["run_id"].cast(pa.large_string()),
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
        gone = (
            pa.table({c: deletions[c].cast(pa.large_string()) for c in ("uri", "run_id")})
            .group_by("uri")
            .aggregate([("run_id", "max")])
        )
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
