"""Stage 1: list the input, keep image extensions, count what is skipped; streams in chunks."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncGenerator, Iterable, Iterator
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa

from pipeline.config import NotRetryableError
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


class InputError(NotRetryableError):
    """The input cannot be listed, or holds no image."""


@dataclasses.dataclass
class ListingCounts:
    listed: int = 0
    skipped_by_extension: int = 0
    duplicates: int = 0  # listed again after their first time (an input list): taken once


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    if info.get("version"):  # given by an --input-list
        return f"version:{info['version']}"
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return f"etag:{str(info[key]).strip(chr(34))}"
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            value = info[key]
            return f"mtime:{value.isoformat() if hasattr(value, 'isoformat') else repr(value)}"
    return ""


def iter_image_files(
    fs: Any, root: str, counts: ListingCounts, *, concurrency: int = 1
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(path, info)`` of every image file under ``root``, in a stable order.

    Object stores with a paginated lister (s3fs's ``_iterdir``) are read one page of keys at
    a time, by up to ``concurrency`` requests at once (:class:`ShardedLister`), so a prefix of
    ten million keys never sits in the driver's memory; other filesystems are walked one
    directory at a time. ``counts`` is updated as files are seen.
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
        for path, info in _iter_files(fs, root, concurrency):
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


def _iter_files(fs: Any, root: str, concurrency: int = 1) -> Iterator[tuple[str, dict[str, Any]]]:
    if hasattr(fs, "_iterdir") and getattr(fs, "loop", None) is not None:
        bucket, _, prefix = root.partition("/")
        lister = ShardedLister(fs, bucket, f"{prefix}/" if prefix else "", concurrency)
        for page in _sync_pages(fs.loop, lister.pages()):
            for info in page:
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


# A prefix is split into its "subfolders" (one delimiter listing) while there are fewer
# shards than this many per concurrent request, down to this depth; a prefix with SPLIT_FILES
# files or more right under it, or more than SPLIT_FOLDERS subfolders, is listed whole instead.
SHARDS_PER_REQUEST = 4
MAX_SPLIT_DEPTH = 4
SPLIT_FILES = 100
SPLIT_FOLDERS = 100_000
# Pages of keys a shard's lister may hold ahead of the consumer.
PAGES_AHEAD = 4


class ShardedLister:
    """List an object-store prefix with ``concurrency`` requests in flight, in a stable order.

    The prefix is first split into shards by delimiter listings (its "subfolders"); then up
    to ``concurrency`` shards are listed at once, each one page (1,000 keys) at a time, and
    their pages are handed out in shard order. What is held is bounded: at most
    ``PAGES_AHEAD`` pages per shard being listed. A flat prefix (no "subfolders") is one
    shard: listed by one chain of requests, as before.

    Works with any fsspec filesystem that has s3fs's ``_iterdir(bucket, prefix=,
    delimiter=)`` async generator and a ``loop``.
    """

    def __init__(self, fs: Any, bucket: str, prefix: str, concurrency: int) -> None:
        self.fs, self.bucket, self.prefix = fs, bucket, prefix
        self.concurrency = max(1, concurrency)

    async def pages(self) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Pages of info dicts (files only, and whole pages), in shard order."""
        import asyncio

        leading, shards = await self._shards()
        if leading:
            yield leading
        queues: list[asyncio.Queue[list[dict[str, Any]] | BaseException | None]] = [
            asyncio.Queue(PAGES_AHEAD) for _ in shards
        ]
        next_shard = 0

        async def worker() -> None:
            nonlocal next_shard
            while next_shard < len(shards):
                index, next_shard = next_shard, next_shard + 1
                try:
                    page: list[dict[str, Any]] = []
                    async for info in self.fs._iterdir(
                        self.bucket, prefix=shards[index], delimiter=""
                    ):
                        page.append(info)
                        if len(page) >= PAGE_KEYS:
                            await queues[index].put(page)
                            page = []
                    await queues[index].put(page)
                    await queues[index].put(None)
                except BaseException as exc:  # handed to the consumer, which raises it
                    await queues[index].put(exc)
                    return

        workers = [asyncio.ensure_future(worker()) for _ in range(self.concurrency)]
        try:
            for queue in queues:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    if item:
                        yield item
        finally:
            for task in workers:
                task.cancel()

    async def _shards(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Files found while splitting, and the prefixes left to list, in a stable order."""
        if self.concurrency == 1:
            return [], [self.prefix]
        import asyncio

        files: list[dict[str, Any]] = []
        shards, depth = [self.prefix], 0
        slots = asyncio.Semaphore(self.concurrency)

        async def children(prefix: str) -> list[dict[str, Any]] | None:
            async with slots:
                return await self._children(prefix)

        while len(shards) < self.concurrency * SHARDS_PER_REQUEST and depth < MAX_SPLIT_DEPTH:
            depth += 1
            split: list[str] = []
            found = await asyncio.gather(*(children(prefix) for prefix in shards))
            for prefix, entries in zip(shards, found, strict=True):
                if entries is None:  # too many to split by: list it whole
                    split.append(prefix)
                    continue
                files += [e for e in entries if e.get("type") == "file"]
                split += sorted(
                    e["name"].partition("/")[2] + "/"
                    for e in entries
                    if e.get("type") == "directory"
                )
            if split == shards:
                break
            shards = split
        files.sort(key=lambda info: info["name"])
        return files, shards

    async def _children(self, prefix: str) -> list[dict[str, Any]] | None:
        """The files and "subfolders" right under ``prefix``; ``None`` when it holds
        ``SPLIT_FILES`` files or more (listing it by delimiter would page through them all:
        it is listed whole instead) or more than ``SPLIT_FOLDERS`` subfolders."""
        entries: list[dict[str, Any]] = []
        files = 0
        # Small pages (S3's MaxKeys): a prefix of many files costs one short page to rule out.
        listing = self.fs._iterdir(self.bucket, prefix=prefix, delimiter="/", max_items=SPLIT_FILES)
        try:
            async for info in listing:
                entries.append(info)
                files += info.get("type") == "file"
                if files >= SPLIT_FILES or len(entries) > SPLIT_FOLDERS:
                    return None
        finally:
            await listing.aclose()
        return entries


PAGE_KEYS = 1000


def _sync_pages(loop: Any, agen: AsyncGenerator[Any, None]) -> Iterator[Any]:
    """Drive an async generator living on fsspec's I/O loop from synchronous code, one item
    per hop between threads (an item is a page of keys)."""
    from fsspec.asyn import sync

    sentinel = object()

    async def next_item() -> Any:
        try:
            return await agen.__anext__()
        except StopAsyncIteration:
            return sentinel

    try:
        while (item := sync(loop, next_item)) is not sentinel:
            yield item
    finally:
        sync(loop, agen.aclose)


def list_images(
    fs: Any,
    root: str,
    counts: ListingCounts,
    *,
    chunk_rows: int,
    limit: int | None = None,
    concurrency: int = 1,
    tables: Iterable[pa.Table] | None = None,
) -> Iterator[pa.Table]:
    """List the images under ``root`` as Arrow tables of at most ``chunk_rows`` rows.

    Args:
        fs: The input filesystem.
        root: The input path on it.
        counts: Updated as files are seen (listed, skipped by extension).
        chunk_rows: Rows per yielded table; each becomes one Ray Data block.
        limit: Stop after this many images.
        concurrency: LIST requests in flight at once, on object stores.
        tables: The input's files from elsewhere, as tables of ``LISTING_SCHEMA`` plus an
            ``image`` flag (an ``--input-list``: :func:`pipeline.inventory.list_tables`),
            instead of listing ``root``.

    Returns:
        An iterator of tables with ``LISTING_SCHEMA``: ``uri`` (public), ``path`` (on ``fs``),
        ``file_size`` and ``source_version`` (ETag or mtime).

    Example:
        >>> import fsspec, tempfile
        >>> counts = ListingCounts()
        >>> list(list_images(fsspec.filesystem("file"), tempfile.mkdtemp(), counts, chunk_rows=8))
        []
    """
    if tables is not None:
        yield from _chunks_of(tables, counts, chunk_rows, limit)
        return
    rows: dict[str, list[Any]] = {name: [] for name in LISTING_SCHEMA.names}
    taken = 0
    for path, info in iter_image_files(fs, root, counts, concurrency=concurrency):
        uri = to_uri(fs, path)
        if not _is_utf8(uri):
            # A local name that is not UTF-8 (Python holds its bytes as surrogates): no
            # Arrow string can hold it. It is listed under its bytes percent-encoded, with no
            # path, and decode gives it an error row (bad_file_name) that says to rename it.
            uri, path = quote(os.fsencode(uri), safe="/"), ""
        rows["uri"].append(uri)
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


def _chunks_of(
    tables: Iterable[pa.Table], counts: ListingCounts, chunk_rows: int, limit: int | None
) -> Iterator[pa.Table]:
    """Listed tables (with an ``image`` flag) -> ``LISTING_SCHEMA`` chunks of the images,
    ``chunk_rows`` each but the last: Arrow filters and slices, no per-row Python.

    Each table is made one contiguous chunk first (Ray Data's blocks hold several), so that
    taking a chunk's rows copies only them; and each chunk is a copy of its rows, because a
    slice carries its whole table's buffers wherever it is sent.
    """
    rest: pa.Table | None = None  # fewer than chunk_rows images, to go first in the next chunk
    taken = 0
    for table in tables:
        images = table.filter(table["image"]).drop_columns(["image"])
        counts.skipped_by_extension += table.num_rows - images.num_rows
        if limit is not None:
            images = images.slice(0, limit - taken)
        counts.listed += images.num_rows
        taken += images.num_rows
        if rest is not None:
            images = pa.concat_tables([rest, images])
        images = images.combine_chunks()
        whole = images.num_rows - images.num_rows % chunk_rows
        for start in range(0, whole, chunk_rows):
            yield images.slice(start, chunk_rows).take(np.arange(chunk_rows))
        rest = images.slice(whole)
        if limit is not None and taken >= limit:
            break
    if rest is not None and rest.num_rows:
        yield rest.take(np.arange(rest.num_rows))
