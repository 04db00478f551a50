"""Incremental runs: which listed images the committed tables already hold, and which are gone.

An image is identified by its URI and versioned by ``(file_size, source_version)``, where the
version is the store's ETag or the file's mtime. A run embeds only images whose key is not in
the current table; a changed image gets a new row in the new run, and readers keep the latest
row per URI (:mod:`pipeline.current`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.current import KeyIndex, resolve_rows, take_rows
from pipeline.listing import ListingCounts, list_images
from pipeline.manifest import Failures, Manifest, count_failures, failures_by_type
from pipeline.output import Output, Snapshot
from pipeline.read import load_table

# Failed images are retried only when the failure may be transient.
RETRIED_ERROR_TYPES = frozenset({"unreadable"})

# Listing rows per chunk: the unit of the diff, and of the new images fed to the plan (which
# re-splits them into decode-sized blocks). Each chunk costs the diff a fixed time besides its
# rows, which larger chunks spread; past a few thousand rows the gain is small
# (``bench.scale diff`` measures it).
LISTING_BLOCK_ROWS = 4096

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
    # Of ``known_failures``, those of runs whose verdict refused them: they count again.
    unaccepted_failures: dict[str, Failures] = dataclasses.field(default_factory=dict)

    @property
    def known_failed(self) -> int:
        return count_failures(self.known_failures)

    @property
    def to_embed(self) -> int:
        return self.counts.listed - self.counts.duplicates - self.unchanged - self.known_failed


def list_new_images(
    fs: Any,
    root: str,
    *,
    known: CommittedImages | None,
    keep: Callable[[pa.Table], Any] | None,
    limit: int | None = None,
    max_listed: int | None = None,
    concurrency: int = 1,
    tables: Iterable[pa.Table] | None = None,
) -> NewImages:
    """List the input and keep what the committed tables do not already hold.

    Each kept chunk goes to the object store as it is listed, so the driver holds one chunk of
    the listing at a time, plus the current table's keys (``known``) when there is one.

    Args:
        fs: The input's filesystem.
        root: The input's path on it.
        known: The current tables' keys, indexed (:class:`CommittedImages`), or ``None``
            to embed everything (``--full``, or a new output).
        keep: Where each chunk of new images goes as it is listed (``ray.put``: the run's
            refs); ``None`` counts them only (a dry run).
        limit: List at most this many images; a limited listing records no deletions.
        max_listed: Give up once this many images are listed and more may follow
            (``complete`` is then False).
        concurrency: LIST requests in flight at once, on object stores.
        tables: The input's files from an ``--input-list`` instead of listing ``root``
            (:func:`pipeline.inventory.list_tables`).
    """
    counts = ListingCounts()
    chunks = list_images(
        fs,
        root,
        counts,
        chunk_rows=LISTING_BLOCK_ROWS,
        limit=limit,
        concurrency=concurrency,
        tables=tables,
    )
    return diff_listing(
        chunks,
        counts,
        known=known,
        keep=keep,
        limited=limit is not None,
        max_listed=max_listed,
        unique=UriSet() if tables is not None else None,
    )


def diff_listing(
    chunks: Iterable[pa.Table],
    counts: ListingCounts,
    *,
    known: CommittedImages | None,
    keep: Callable[[pa.Table], Any] | None,
    limited: bool = False,
    max_listed: int | None = None,
    unique: UriSet | None = None,
) -> NewImages:
    """Diff listing chunks, as they come, against the committed tables (see
    :func:`list_new_images`); ``counts`` is the lister's, read as it goes.

    Each chunk costs time in proportion to its own rows: the committed keys are indexed
    once (``known``). ``keep``'s non-``None`` results become ``refs``. ``unique``: drop the
    rows whose URI an earlier row had (an input list may name a URI twice; a listing of a
    folder or prefix cannot), counted in ``counts.duplicates``.
    """
    known = known or CommittedImages.empty()
    refs, unchanged, failed_rows, complete = [], 0, [], True
    for chunk in chunks:
        if max_listed is not None and counts.listed > max_listed:
            complete = False
            break
        if unique is not None:
            first = unique.add(chunk["uri"])
            if not first.all():
                counts.duplicates += int((~first).sum())
                chunk = chunk.filter(pa.array(first))
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
    failed = np.concatenate([np.zeros(0, np.int64), *failed_rows])
    return NewImages(
        refs=refs,
        counts=counts,
        unchanged=unchanged,
        known_failures=known.failures(failed),
        deleted=deleted,
        complete=complete,
        unaccepted_failures=known.failures(failed[known.refused[failed]]),
    )


class UriSet:
    """The URIs seen so far, by two independent 64-bit hashes (16 bytes a URI, no strings
    kept): :meth:`add` says which of a batch are seen for the first time.

    Sorted runs of hashes are merged as they double in size (a log-structured merge), so a
    batch costs ``O(n log N)`` lookups and each hash is merged ``O(log N)`` times. Runs are
    sorted by the first hash, plain ``uint64`` arrays, with the second beside it. Two URIs
    would be taken for one only if both their hashes collided (some 1e-20 for a billion).

    Example:
        >>> seen = UriSet()
        >>> seen.add(pa.array(["a", "b", "a"])).tolist(), seen.add(pa.array(["b", "c"])).tolist()
        ([True, True, False], [False, True])
    """

    _SECOND_KEY = "embed-images-2nd"  # pandas' hash_key: 16 bytes

    def __init__(self) -> None:
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []  # (h1 sorted, h2), each run

    @property
    def nbytes(self) -> int:
        return sum(h1.nbytes + h2.nbytes for h1, h2 in self.levels)

    def add(self, uris: pa.Array | pa.ChunkedArray) -> np.ndarray:
        from pandas.util import hash_array

        values = pc.cast(uris, pa.large_string()).to_numpy(zero_copy_only=False)
        h1 = hash_array(values, categorize=False)
        h2 = hash_array(values, hash_key=self._SECOND_KEY, categorize=False)
        first = np.ones(len(values), dtype=bool)
        # Within the batch: the first occurrence of each (h1, h2).
        order = np.lexsort((np.arange(len(values)), h2, h1))
        same = (h1[order][1:] == h1[order][:-1]) & (h2[order][1:] == h2[order][:-1])
        first[order[1:][same]] = False
        # Against the earlier batches.
        for seen1, seen2 in self.levels:
            first &= ~_contains(seen1, seen2, h1, h2)
        new1, new2 = h1[first], h2[first]
        while self.levels and len(self.levels[-1][0]) <= len(new1):
            old1, old2 = self.levels.pop()
            new1, new2 = np.concatenate([old1, new1]), np.concatenate([old2, new2])
        by_h1 = np.argsort(new1, kind="stable")
        self.levels.append((new1[by_h1], new2[by_h1]))
        return first


def _contains(seen1: np.ndarray, seen2: np.ndarray, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """Which ``(h1, h2)`` pairs a run sorted by ``seen1`` holds (equal first hashes sit side by
    side: each is checked, a rare loop)."""
    found = np.zeros(len(h1), dtype=bool)
    if len(seen1) == 0:
        return found
    at = np.searchsorted(seen1, h1)
    while True:
        inside = at < len(seen1)
        candidates = np.flatnonzero(inside)
        if candidates.size == 0:
            return found
        place = at[candidates]
        same1 = seen1[place] == h1[candidates]
        found[candidates[same1 & (seen2[place] == h2[candidates])]] = True
        # Only a first hash shared by two URIs needs the next place looked at.
        again = candidates[same1 & ~found[candidates]]
        if again.size == 0:
            return found
        at = np.full(len(h1), len(seen1), dtype=at.dtype)
        at[again] = place[same1 & ~found[candidates]] + 1


@dataclasses.dataclass(frozen=True)
class ChunkDiff:
    new: pa.Table
    unchanged: int
    known_failed_rows: np.ndarray  # rows of CommittedImages.errors


class CommittedImages:
    """The committed images a run need not embed again, indexed once per run.

    Embedded images and images that failed for a lasting reason (everything but
    ``RETRIED_ERROR_TYPES``) are known; a listed image whose key is among them is skipped.
    Every current URI is indexed too, so that a complete listing can tell which are gone.
    Each listed image costs two hashes and two binary searches (:class:`KeyIndex`), whatever
    the size of the committed table, and the tables are indexed where they lie (no copy).

    Args:
        embeddings: Committed rows with ``EMBEDDINGS_KEY_COLUMNS``.
        errors: Committed rows with ``ERRORS_KEY_COLUMNS``.
        current: The rows of each that are current (:func:`resolve_rows`); default: all.
        refused: Runs whose failures no verdict has accepted (``Manifest.refused``).

    Example:
        >>> known = CommittedImages(embeddings, errors)  # doctest: +SKIP
        >>> known.diff(listing_chunk).new  # doctest: +SKIP
    """

    def __init__(
        self,
        embeddings: pa.Table,
        errors: pa.Table,
        current: tuple[np.ndarray, np.ndarray] | None = None,
        *,
        refused: Sequence[str] = (),
    ) -> None:
        self.errors = errors
        # Error rows of runs whose verdict refused them (their failures count again).
        self.refused = (
            pc.is_in(errors["run_id"], pa.array(list(refused), errors["run_id"].type))
            .to_numpy(zero_copy_only=False)
            .astype(bool)
            if refused and "run_id" in errors.column_names and errors.num_rows
            else np.zeros(errors.num_rows, dtype=bool)
        )
        self.n_embedded = embeddings.num_rows
        emb_rows, err_rows = current or (np.arange(embeddings.num_rows), np.arange(errors.num_rows))
        # Both tables end to end (embedded rows first), as they lie: large_string, because
        # past some 19 million URIs a string column's offsets overflow.
        keys = pa.concat_tables(
            [_key_columns(t, EMBEDDINGS_KEY_COLUMNS) for t in (embeddings, errors)]
        )
        lasting = pc.invert(pc.is_in(errors["error_type"], pa.array(sorted(RETRIED_ERROR_TYPES))))
        lasting_rows = err_rows[lasting.to_numpy(zero_copy_only=False)[err_rows]]
        # Embedded images and lasting failures by their whole key; every image by its URI.
        self.keys = KeyIndex(
            keys,
            EMBEDDINGS_KEY_COLUMNS,
            rows=np.concatenate([emb_rows, self.n_embedded + lasting_rows]),
        )
        self.current_rows = np.concatenate([emb_rows, self.n_embedded + err_rows]).astype(np.int64)
        self.current = KeyIndex(keys, ["uri"], rows=self.current_rows)
        self.seen = np.zeros(keys.num_rows, dtype=bool)

    @classmethod
    def empty(cls) -> CommittedImages:
        return cls(NO_EMBEDDINGS, NO_ERRORS)

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
        gone = self.current_rows[~self.seen[self.current_rows]]
        return take_rows(self.current.table["uri"], np.sort(gone))

    def failures(self, rows: np.ndarray) -> dict[str, Failures]:
        """Known failures (rows of the errors table) by ``error_type``, with a count and one
        example URI each."""
        return failures_by_type(
            *(
                take_rows(self.errors[column], rows).to_numpy(zero_copy_only=False)
                if column in self.errors.column_names
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


def committed_images(
    output: Output, snapshot: Snapshot, *, pending: bool = False
) -> CommittedImages:
    """The current images' keys, indexed for a run's diff; the key columns are read once,
    as ``large_string``, and indexed where they lie (superseded rows are skipped, not
    copied out).

    Args:
        snapshot: From :meth:`Output.snapshot`.
        pending: The pending files of a ``--full`` run instead (one resuming them).
    """
    manifest = output.require(snapshot)
    if pending:
        assert manifest.pending is not None
        manifest = Manifest(
            current=manifest.pending.files,
            runs=[],
            sequence={r: n for n, r in enumerate(manifest.pending.runs)},
        )
    narrow = ["uri", "run_id"]
    emb = load_table(
        output, manifest, "embeddings", [*EMBEDDINGS_KEY_COLUMNS, "run_id"], large=True
    )
    err = load_table(output, manifest, "errors", [*ERRORS_KEY_COLUMNS, "run_id"], large=True)
    gone = load_table(output, manifest, "deletions", narrow, large=True)
    rows = resolve_rows(emb, err, gone, order=manifest.commit_order())
    return CommittedImages(emb, err, rows, refused=manifest.refused)
