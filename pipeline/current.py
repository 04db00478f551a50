"""Which committed rows are current: per URI, its latest row in commit order, unless the
image was deleted since. The readers, the diff and the compaction all ask this module; the
diff asks through :class:`CommittedImages`, the current keys indexed once per run.

Rows are found by key without sorting strings: each key is hashed to 64 bits once
(:func:`hash_keys`) and looked up in a sorted array of hashes (:class:`KeyIndex`); a hash
match is always checked against the key itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Failed images are retried only when the failure may be transient.
RETRIED_ERROR_TYPES = frozenset({"unreadable"})

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


class KeyIndex:
    """Rows of a table found by their key columns: each key hashed once, looked up per batch.

    The table's keys are hashed to 64 bits once and sorted; a batch of ``n`` probes costs
    ``O(n log N)``, never a rebuild over the ``N`` indexed rows. A hash match is checked
    against the indexed row's columns, so a collision can only make a key look absent (for
    the diff: embedded again), never make an absent key look present. The table is not
    copied; the index adds 16 bytes per indexed row.

    Args:
        table: Holds the key columns (any chunking).
        columns: The key.
        rows: Index only these rows of ``table`` (default: all).

    Example:
        >>> index = KeyIndex(pa.table({"uri": ["a", "b"], "n": [1, 2]}), ["uri", "n"])
        >>> index.find(pa.table({"uri": ["b", "a", "c"], "n": [2, 9, 1]})).tolist()
        [1, -1, -1]
    """

    def __init__(
        self, table: pa.Table, columns: Sequence[str], rows: np.ndarray | None = None
    ) -> None:
        self.columns = list(columns)
        self.table = table.select(self.columns)
        hashes = hash_keys(self.table, self.columns)
        if rows is not None:
            hashes = hashes[rows]
        by_hash = np.argsort(hashes, kind="stable")
        self.sorted = hashes[by_hash]
        self.order = by_hash if rows is None else np.asarray(rows, np.int64)[by_hash]

    def __len__(self) -> int:
        return len(self.sorted)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """The indexed row whose key hash is each of ``hashes``, or -1: not yet checked
        against the keys themselves (:meth:`find` does that)."""
        if len(self.sorted) == 0:
            return np.full(len(hashes), -1, np.int64)
        at = np.minimum(np.searchsorted(self.sorted, hashes), len(self.sorted) - 1)
        return np.where(self.sorted[at] == hashes, self.order[at], -1).astype(np.int64)

    def find(self, probe: pa.Table) -> np.ndarray:
        """The indexed row of each probe row's key, or -1 where it has none."""
        if len(self.sorted) == 0 or probe.num_rows == 0:
            return np.full(probe.num_rows, -1, np.int64)
        rows = self.lookup(hash_keys(probe, self.columns))
        candidates = np.flatnonzero(rows >= 0)
        if candidates.size:
            same = np.ones(candidates.size, dtype=bool)
            for column in self.columns:
                same &= _equal_rows(self.table[column], rows[candidates], probe[column], candidates)
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


def resolve_current(
    embeddings: pa.Table,
    errors: pa.Table,
    deletions: pa.Table,
    *,
    order: Sequence[str] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Keep, per URI, only its latest row across both tables, and drop URIs deleted since
    (the rows :func:`resolve_rows` picks)."""
    emb_rows, err_rows = resolve_rows(embeddings, errors, deletions, order=order)
    return embeddings.take(emb_rows), errors.take(err_rows)


def resolve_rows(
    embeddings: pa.Table,
    errors: pa.Table,
    deletions: pa.Table,
    *,
    order: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows are current: per URI its latest row across both tables, unless deleted since.

    Each URI is hashed once and rows are sorted by (hash, run): no string sort, and no copy
    of the URI column. Rows that share a hash are checked to share the URI; should two
    URIs ever share a 64-bit hash, the exact string sort (:func:`_resolve_by_sort`) decides.

    Args:
        embeddings: Rows with at least ``uri`` and ``run_id``.
        errors: Likewise.
        deletions: ``uri`` and ``run_id`` of images found gone in that run.
        order: The run ids in commit order (:meth:`Manifest.commit_order`): "latest" is the
            run committed last, whatever its id or its driver's clock. ``None``: run ids in
            sorted order (what a manifest without a commit sequence implies).

    Returns:
        The current rows of embeddings and of errors, in order; one per URI (a URI listed
        twice in one run keeps one row). A deletion removes a URI whose latest row is
        older than it.
    """
    n_emb = embeddings.num_rows
    uris = _column(embeddings, errors, "uri")
    if len(uris) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    run_ids = _column(embeddings, errors, "run_id")
    gone_runs = deletions["run_id"].cast(pa.large_string())
    found = pc.unique(pa.chunked_array([*run_ids.chunks, *gone_runs.chunks], pa.large_string()))
    found = found.take(pc.sort_indices(found))
    if order is not None:  # commit order; a run id it lacks sorts before every listed one
        listed = set(order)
        runs = pa.array(
            [r for r in found.to_pylist() if r not in listed] + list(order), pa.large_string()
        )
    else:
        runs = found
    rank = pc.index_in(run_ids, value_set=runs).to_numpy(zero_copy_only=False)
    hashes = hash_keys(pa.table({"uri": uris}), ["uri"])
    by_key = np.lexsort((-rank, hashes))  # by hash, then latest run first
    sorted_hashes = hashes[by_key]
    first = np.ones(len(by_key), dtype=bool)
    first[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
    later = np.flatnonzero(~first)  # an older row of the URI before it, unless a collision
    if later.size and not _all_equal(uris, by_key[later], by_key[later - 1]):
        return _rows_by_sort(embeddings, errors, deletions, runs)
    keep = by_key[first]
    if deletions.num_rows:
        gone = pa.table({"uri": deletions["uri"].cast(pa.large_string()), "run": gone_runs})
        gone = gone.group_by("uri").aggregate([("run", "max")])
        gone_rank = pc.index_in(gone["run_max"], value_set=runs).to_numpy(zero_copy_only=False)
        index = KeyIndex(gone, ["uri"])
        at = index.lookup(hashes[keep])
        candidates = np.flatnonzero(at >= 0)
        same = _equal_rows(uris, keep[candidates], index.table["uri"], at[candidates])
        deleted = candidates[same][gone_rank[at[candidates[same]]] >= rank[keep[candidates[same]]]]
        alive = np.ones(len(keep), dtype=bool)
        alive[deleted] = False
        keep = keep[alive]
    keep = np.sort(keep)
    return keep[keep < n_emb], keep[keep >= n_emb] - n_emb


def _column(embeddings: pa.Table, errors: pa.Table, name: str) -> pa.ChunkedArray:
    """One column of both tables, end to end, as ``large_string`` (no copy when it is)."""
    parts = [t[name].cast(pa.large_string()) for t in (embeddings, errors)]
    return pa.chunked_array([c for part in parts for c in part.chunks], pa.large_string())


def _all_equal(values: pa.ChunkedArray, rows: np.ndarray, other_rows: np.ndarray) -> bool:
    return bool(_equal_rows(values, rows, values, other_rows).all())


def _equal_rows(
    values: pa.ChunkedArray, rows: np.ndarray, others: pa.ChunkedArray, other_rows: np.ndarray
) -> np.ndarray:
    """``values[rows] == others[other_rows]``, element by element (taken in slices)."""
    out = np.ones(len(rows), dtype=bool)
    for start in range(0, len(rows), _HASH_SLICE):
        end = start + _HASH_SLICE
        equal = pc.equal(
            take_rows(values, rows[start:end]), take_rows(others, other_rows[start:end])
        )
        out[start:end] = pc.fill_null(equal, False).to_numpy(zero_copy_only=False)
    return out


def _rows_by_sort(
    embeddings: pa.Table, errors: pa.Table, deletions: pa.Table, runs: pa.Array
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resolve_rows` by an exact sort of the URIs (slower, and more memory); ``runs``
    holds the run ids in commit order."""
    n_emb = embeddings.num_rows
    rank = pc.index_in(_column(embeddings, errors, "run_id"), value_set=runs)
    narrow = pa.table({"uri": _column(embeddings, errors, "uri"), "rank": rank})
    order = pc.sort_indices(narrow, [("uri", "ascending"), ("rank", "descending")]).to_numpy()
    uris = narrow["uri"].take(order)
    first = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        first[1:] = pc.not_equal(uris[1:], uris[:-1]).to_numpy(zero_copy_only=False)
    keep = order[first]
    if deletions.num_rows:
        latest = narrow.take(keep)
        gone = (
            pa.table(
                {
                    "uri": deletions["uri"].cast(pa.large_string()),
                    "rank": pc.index_in(
                        deletions["run_id"].cast(pa.large_string()), value_set=runs
                    ),
                }
            )
            .group_by("uri")
            .aggregate([("rank", "max")])
        )
        joined = latest.append_column("row", pa.array(keep)).join(
            gone, keys="uri", join_type="left outer"
        )
        alive = pc.or_kleene(
            pc.is_null(joined["rank_max"]),
            pc.greater(joined["rank"], joined["rank_max"]),
        )
        keep = joined.filter(pc.fill_null(alive, True))["row"].to_numpy()
    keep = np.sort(keep)
    return keep[keep < n_emb], keep[keep >= n_emb] - n_emb


def take_rows(values: pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """``values.take(rows)`` chunk by chunk: pyarrow's own take on a chunked array first
    concatenates every chunk (a copy of the whole column, for each call)."""
    if values.num_chunks <= 1:
        return values.combine_chunks().take(pa.array(rows, pa.int64()))
    offsets = np.cumsum([0, *(len(chunk) for chunk in values.chunks)])
    which = np.searchsorted(offsets, rows, side="right") - 1
    by_chunk = np.argsort(which, kind="stable")
    parts = []
    for k in np.unique(which):
        local = rows[by_chunk][which[by_chunk] == k] - offsets[k]
        parts.append(values.chunk(int(k)).take(pa.array(local, pa.int64())))
    gathered = pa.concat_arrays(parts) if parts else pa.array([], values.type)
    inverse = np.empty_like(by_chunk)
    inverse[by_chunk] = np.arange(len(by_chunk))
    return gathered.take(pa.array(inverse, pa.int64()))


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

    def failure_columns(self, rows: np.ndarray) -> list[Sequence[Any]]:
        """``error_type``, ``uri`` and ``error_message`` of these rows of the errors table (for
        :func:`pipeline.failures.failures_by_type`)."""
        return [
            take_rows(self.errors[column], rows).to_numpy(zero_copy_only=False)
            if column in self.errors.column_names
            else [""] * len(rows)
            for column in ("error_type", "uri", "error_message")
        ]


_KEY_TYPES = {
    "uri": pa.large_string(),
    "file_size": pa.int64(),
    "source_version": pa.large_string(),
}


def _key_columns(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    return pa.table({c: table[c].cast(_KEY_TYPES[c]) for c in columns})
