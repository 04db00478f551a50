"""Reuse by content: a listed image whose bytes the table already embedded costs a read, not a
forward pass (and, where the listing's ETag is the bytes' MD5, not even the read).

Every embeddings row records ``content_sha256``, the sha256 of the file's bytes, computed by
the decode stage from the bytes it reads anyway. Before the plan starts, the driver indexes the
hashes of the rows in the table's current files (:func:`content_index`, one read of three narrow
columns) and puts the index in the object store. Then:

- the decode stage hashes each file it reads and looks it up: a hit is not decoded, and the
  model stage skips it;
- a listed image whose ``source_version`` is a single-part ETag (the MD5 of its bytes) equal to
  a stored row's, with the same size, is a hit before any read;
- the writer copies a hit's vector, original size and format from the stored row
  (:func:`fill_reused`), reading only the row groups that hold it.

The index keys are the first 128 bits of sha256 (a match by accident: about 2^-64 in a table
of a billion rows); the writer checks the whole digest against the stored row's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.output import ConcurrentCommitError
from pipeline.storage import arrow_filesystem, join, open_fs

# The embeddings column that holds the sha256 of the file's bytes.
CONTENT_COLUMN = "content_sha256"
CONTENT_TYPE = pa.binary(32)
# A hit's columns, copied from the stored row.
STORED_COLUMNS = ["original_width", "original_height", "format", "embedding", CONTENT_COLUMN]
# ``source_version`` of an object whose ETag is its MD5: a single-part upload's (a multipart
# ETag ends in ``-PARTS``; GCS's base64 md5Hash does not match either).
_MD5_ETAG = re.compile(r"^etag:([0-9a-f]{32})$")
# Current files read at once while the driver builds the index.
INDEX_READERS = 16

_KEY = np.dtype([("hi", ">u8"), ("lo", ">u8")])
_ETAG_KEY = np.dtype([("hi", ">u8"), ("lo", ">u8"), ("size", ">i8")])


def content_digest(data: bytes) -> bytes:
    """The sha256 of a file's bytes (hashlib releases the GIL for large inputs)."""
    return hashlib.sha256(data).digest()


@dataclasses.dataclass(frozen=True)
class ContentIndex:
    """The table's rows by the content they embed, for the stages to look up.

    ``keys`` (128 bits of sha256) are sorted; row ``i`` of the index is row ``row[i]`` of file
    ``files[file[i]]`` (relative to the output ``uri``). ``etags``, sorted, point into the same rows
    (``etag_at``): the rows whose ``source_version`` is a single-part ETag. 24 bytes per
    indexed row, and 32 more per row with such an ETag.
    """

    uri: str
    files: list[str]
    keys: np.ndarray
    file: np.ndarray
    row: np.ndarray
    etags: np.ndarray
    etag_at: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, digests: Sequence[bytes]) -> np.ndarray:
        """The index row holding each digest (32 bytes; ``b""``: none), or -1."""
        out = np.full(len(digests), -1, np.int64)
        asked = [i for i, d in enumerate(digests) if len(d) == 32]
        if asked and len(self.keys):
            probe = np.frombuffer(b"".join(digests[i][:16] for i in asked), _KEY)
            out[asked] = _search(self.keys, probe)
        return out

    def find_etags(self, versions: Sequence[str] | np.ndarray, sizes: Sequence[int]) -> np.ndarray:
        """The index row whose ETag and size are each listed image's, or -1."""
        out = np.full(len(versions), -1, np.int64)
        if not len(self.etags):
            return out
        md5 = [_md5(str(v)) for v in versions]
        asked = [i for i, m in enumerate(md5) if m is not None]
        if asked:
            probe = np.zeros(len(asked), _ETAG_KEY)
            digests = np.frombuffer(b"".join(md5[i] for i in asked), _KEY)  # type: ignore[misc]
            probe["hi"], probe["lo"] = digests["hi"], digests["lo"]
            probe["size"] = [int(sizes[i]) for i in asked]
            at = _search(self.etags, probe)
            out[asked] = np.where(at >= 0, self.etag_at[np.maximum(at, 0)], -1)
        return out


def _search(sorted_keys: np.ndarray, probe: np.ndarray) -> np.ndarray:
    at = np.minimum(np.searchsorted(sorted_keys, probe), len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == probe, at, -1).astype(np.int64)


def _md5(version: str) -> bytes | None:
    match = _MD5_ETAG.match(version)
    return bytes.fromhex(match.group(1)) if match else None


def content_index(
    uri: str,
    files: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    by_etag: bool = True,
) -> ContentIndex:
    """Index the rows of an output's files (paths relative to its ``uri``) by content.

    Reads ``content_sha256``, ``source_version`` and ``file_size`` of each file,
    ``INDEX_READERS`` files at once; rows written before the column existed have no hash and
    are not indexed. ``by_etag``: index single-part ETags too (else only sha256 finds a row).
    """
    fs, root = open_fs(uri, storage_options or {})
    schema = pa.schema(
        [
            pa.field(CONTENT_COLUMN, CONTENT_TYPE),
            pa.field("source_version", pa.string()),
            pa.field("file_size", pa.int64()),
        ]
    )

    with concurrent.futures.ThreadPoolExecutor(INDEX_READERS) as pool:
        tables = list(pool.map(lambda path: read_columns(fs, join(root, path), schema), files))
    parts = [_file_keys(k, t) for k, t in enumerate(tables)]
    del tables
    keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, _KEY)
    file = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    row = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int32)
    etags = np.concatenate([p[3] for p in parts]) if parts and by_etag else np.zeros(0, _ETAG_KEY)
    # Each file's rows with an ETag, as rows of ``keys`` (the files' rows end to end).
    starts = np.cumsum([0, *(len(p[0]) for p in parts)])
    etag_rows = (
        np.concatenate([p[4] + start for p, start in zip(parts, starts, strict=False)])
        if len(etags)
        else np.zeros(0, np.int64)
    )
    order = np.argsort(keys, kind="stable")
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    etag_order = np.argsort(etags, kind="stable")
    return ContentIndex(
        uri=uri,
        files=list(files),
        keys=keys[order],
        file=file[order],
        row=row[order],
        etags=etags[etag_order],
        etag_at=position[etag_rows[etag_order]],
    )


def read_columns(fs: Any, path: str, schema: pa.Schema) -> pa.Table:
    """A few columns of one Parquet file, by ranged reads; a column the file lacks (written
    before it existed, as ``content_sha256``) reads as null."""
    return pads.dataset(
        path, filesystem=arrow_filesystem(fs), format="parquet", schema=schema
    ).to_table()


def _file_keys(
    k: int, table: pa.Table
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One file's rows with a hash: their keys, file number, row in the file; and of those,
    the rows with a single-part ETag: their ETag keys and positions among the rows kept."""
    digests = table[CONTENT_COLUMN].combine_chunks()
    hashed = np.flatnonzero(~digests.is_null().to_numpy(zero_copy_only=False))
    keys = np.zeros(len(hashed), _KEY)
    if len(hashed):
        keys = _fixed_bytes(digests, 32)[hashed, :16].copy().view(_KEY).reshape(-1)
    versions = table["source_version"].combine_chunks().take(pa.array(hashed, pa.int64()))
    single = pc.fill_null(pc.match_substring_regex(versions, _MD5_ETAG.pattern), False)
    with_etag = np.flatnonzero(single.to_numpy(zero_copy_only=False))
    etags = np.zeros(len(with_etag), _ETAG_KEY)
    if len(with_etag):
        hex_digits = pc.utf8_slice_codeunits(versions.filter(single), 5, 37)
        tags = _from_hex(_fixed_bytes(hex_digits.cast(pa.binary()).cast(pa.binary(32)), 32))
        etags["hi"], etags["lo"] = tags["hi"], tags["lo"]
        sizes = table["file_size"].to_numpy(zero_copy_only=False)
        etags["size"] = sizes[hashed[with_etag]]
    return keys, np.full(len(hashed), k, np.int32), hashed.astype(np.int32), etags, with_etag


def _fixed_bytes(values: pa.Array, width: int) -> np.ndarray:
    """A ``fixed_size_binary(width)`` array's values as an ``(n, width)`` uint8 view."""
    data = np.frombuffer(values.buffers()[1], np.uint8)
    return data[values.offset * width : (values.offset + len(values)) * width].reshape(-1, width)


def _from_hex(digits: np.ndarray) -> np.ndarray:
    """``(n, 32)`` ASCII lowercase hex digits -> ``n`` 128-bit keys."""
    nibbles = np.where(digits >= ord("a"), digits - ord("a") + 10, digits - ord("0"))
    packed = (nibbles[:, 0::2] << 4 | nibbles[:, 1::2]).astype(np.uint8)
    return np.ascontiguousarray(packed).view(_KEY).reshape(-1)


# Indexes a worker process has taken from the object store, by the ref's id.
_TAKEN: dict[str, ContentIndex] = {}


def take_index(ref: Any) -> ContentIndex | None:
    """The index behind an object ref (``None``: no reuse), fetched once per process."""
    if ref is None:
        return None
    if isinstance(ref, ContentIndex):
        return ref
    key = ref.hex()
    if key not in _TAKEN:
        import ray

        _TAKEN.clear()  # one run's index at a time
        _TAKEN[key] = ray.get(ref)
    return _TAKEN[key]


def fill_reused(
    batch: dict[str, np.ndarray], index: ContentIndex, storage_options: Mapping[str, Any]
) -> int:
    """Copy each hit's vector, original size, format and digest from its stored row into the
    batch (in place); returns the number of hits.

    Reads, per stored file, only the row groups that hold hits.

    Raises:
        ValueError: a stored row's digest is not the one the image was found by (a 128-bit
            collision, or a table changed under the run): the run fails, nothing is copied.
    """
    at = np.asarray(batch["reuse"], dtype=np.int64)
    hits = np.flatnonzero(at >= 0)
    if not len(hits):
        return 0
    for key in STORED_COLUMNS:  # Ray hands a batch's columns over read-only
        batch[key] = np.array(batch[key])
    fs, root = open_fs(index.uri, storage_options)
    files = index.file[at[hits]]
    for k in np.unique(files):
        mine = hits[files == k]
        stored = read_rows(fs, join(root, index.files[int(k)]), index.row[at[mine]])
        for j, i in enumerate(mine):
            digest = stored[CONTENT_COLUMN][j].as_py()
            found_by = bytes(batch[CONTENT_COLUMN][i])
            if found_by and digest != found_by:
                raise ValueError(
                    f"{batch['uri'][i]}: the stored row found by its content holds another "
                    f"digest ({index.files[int(k)]})"
                )
            batch[CONTENT_COLUMN][i] = digest
        vectors = stored["embedding"].combine_chunks().flatten().to_numpy()
        batch["embedding"][mine] = vectors.reshape(len(mine), -1)
        batch["original_width"][mine] = stored["original_width"].to_numpy()
        batch["original_height"][mine] = stored["original_height"].to_numpy()
        batch["format"][mine] = stored["format"].to_pylist()
    return len(hits)


def read_rows(fs: Any, path: str, rows: np.ndarray) -> pa.Table:
    """Rows of one Parquet file, in the order asked, reading only their row groups."""
    # No read-ahead cache: Parquet's own reads (footer, the row groups' column chunks) are
    # ranged GETs of what they need, not the whole file.
    try:
        handle = fs.open(path, "rb", cache_type="none")
    except FileNotFoundError:
        # Only a commit removes a current file (a compaction, a --full run): the run's
        # snapshot is stale, and its own commit would be refused.
        raise ConcurrentCommitError(
            f"{path} is gone: another run committed (a compaction?) since this run's "
            "snapshot; nothing of this run was committed: run again"
        ) from None
    with handle:
        parquet = pq.ParquetFile(handle)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        groups = np.searchsorted(starts, rows, side="right") - 1
        needed = sorted({int(g) for g in groups})
        table = parquet.read_row_groups(needed, columns=STORED_COLUMNS)
    offset = {g: int(sum(sizes[h] for h in needed if h < g)) for g in needed}
    local = [offset[int(g)] + int(r - starts[g]) for g, r in zip(groups, rows, strict=True)]
    return table.take(pa.array(local, pa.int64()))
