"""Stage 1: list the input, keep image extensions, count what is skipped; streams in chunks."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.config import PipelineError
from pipeline.storage import to_uri

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"})

LISTING_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("file_size", pa.int64(), nullable=False),
        pa.field("source_version", pa.string(), nullable=False),
    ]
)


class InputError(PipelineError):
    """The input cannot be listed, or holds no image."""


@dataclasses.dataclass
class ListingCounts:
    listed: int = 0
    skipped_by_extension: int = 0


def has_image_extension(name: str) -> bool:
    """True for the contract's image extensions, case-insensitively.

    Example:
        >>> has_image_extension("IMG_0001.JPG"), has_image_extension("notes.txt")
        (True, False)
    """
    _, ext = os.path.splitext(name)
    return ext[1:].lower() in IMAGE_EXTENSIONS


def source_version(info: dict[str, Any]) -> str:
    """What tells a changed object from an unchanged one of the same size: ETag, else mtime.

    Example:
        >>> source_version({"ETag": '"9b2cf535f27731c974343645a3985328"'})
        'etag:9b2cf535f27731c974343645a3985328'
    """
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return f"etag:{str(info[key]).strip(chr(34))}"
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            value = info[key]
            return f"mtime:{value.isoformat() if hasattr(value, 'isoformat') else repr(value)}"
    return ""


def iter_image_files(
    fs: Any, root: str, counts: ListingCounts
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(path, info)`` of every image file under ``root``, in a stable order.

    Object stores with a paginated lister (s3fs's ``_iterdir``) are read one page of keys at
    a time, recursively and in key order, so a prefix of ten million keys never sits in the
    driver's memory; other filesystems are walked one directory at a time. ``counts`` is
    updated as files are seen.
    """
    try:
        if fs.isfile(root):
            info = fs.info(root)
            if has_image_extension(root):
                counts.listed += 1
                yield root, info
            else:
                counts.skipped_by_extension += 1
            return
        if not fs.isdir(root):
            raise InputError(f"input not found: {to_uri(fs, root)}")
        for path, info in _iter_files(fs, root):
            if not has_image_extension(path):
                counts.skipped_by_extension += 1
                continue
            counts.listed += 1
            yield path, info
    except PermissionError as exc:
        raise InputError(
            f"cannot list input {to_uri(fs, root)}: permission denied ({exc})"
        ) from None
    except FileNotFoundError:
        raise InputError(f"input not found: {to_uri(fs, root)}") from None


def _iter_files(fs: Any, root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if hasattr(fs, "_iterdir") and getattr(fs, "loop", None) is not None:
        bucket, _, prefix = root.partition("/")
        pages = fs._iterdir(bucket, delimiter="", prefix=f"{prefix}/" if prefix else "")
        for info in _sync_iter(fs.loop, pages):
            if info.get("type") == "file" and not info["name"].endswith("/"):
                yield info["name"], info
        return
    for dirpath, dirnames, files in fs.walk(root, detail=True):
        # fs.walk descends into what is left in ``dirnames``: sort it in place so the
        # listing order (and so --limit) is the same on every run.
        ordered = {name: dirnames[name] for name in sorted(dirnames)}
        dirnames.clear()
        dirnames.update(ordered)
        for name in sorted(files):
            info = files[name]
            if info.get("type", "file") == "file":
                yield f"{dirpath.rstrip('/')}/{name}", info


def _sync_iter(loop: Any, agen: Any, batch: int = 1000) -> Iterator[Any]:
    """Drive an async generator living on fsspec's I/O loop from synchronous code, taking
    ``batch`` items per hop between threads (one S3 page is 1000 keys)."""
    from fsspec.asyn import sync

    async def next_items() -> tuple[list[Any], bool]:
        items: list[Any] = []
        try:
            while len(items) < batch:
                items.append(await agen.__anext__())
        except StopAsyncIteration:
            return items, True
        return items, False

    done = False
    while not done:
        items, done = sync(loop, next_items)
        yield from items


def list_images(
    fs: Any, root: str, counts: ListingCounts, *, chunk_rows: int, limit: int | None = None
) -> Iterator[pa.Table]:
    """List the images under ``root`` as Arrow tables of at most ``chunk_rows`` rows.

    Args:
        fs: The input filesystem.
        root: The input path on it.
        counts: Updated as files are seen (listed, skipped by extension).
        chunk_rows: Rows per yielded table; each becomes one Ray Data block.
        limit: Stop after this many images.

    Returns:
        An iterator of tables with ``LISTING_SCHEMA``: ``uri`` (public), ``path`` (on ``fs``),
        ``file_size`` and ``source_version`` (ETag or mtime).

    Example:
        >>> import fsspec, tempfile
        >>> counts = ListingCounts()
        >>> list(list_images(fsspec.filesystem("file"), tempfile.mkdtemp(), counts, chunk_rows=8))
        []
    """
    rows: dict[str, list[Any]] = {name: [] for name in LISTING_SCHEMA.names}
    taken = 0
    for path, info in iter_image_files(fs, root, counts):
        rows["uri"].append(to_uri(fs, path))
        rows["path"].append(path)
        rows["file_size"].append(int(info.get("size") or 0))
        rows["source_version"].append(source_version(info))
        taken += 1
        if len(rows["uri"]) >= chunk_rows:
            yield pa.table(rows, schema=LISTING_SCHEMA)
            rows = {name: [] for name in LISTING_SCHEMA.names}
        if limit is not None and taken >= limit:
            break
    if rows["uri"]:
        yield pa.table(rows, schema=LISTING_SCHEMA)
