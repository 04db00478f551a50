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


def iter_image_files(fs: Any, root: str, counts: ListingCounts) -> Iterator[tuple[str, int]]:
    """Yield ``(path, size)`` of every image file under ``root``, in a stable order.

    Walks one directory at a time (``fs.walk``) so that the driver never holds the whole
    listing; ``counts`` is updated as files are seen.
    """
    try:
        if fs.isfile(root):
            info = fs.info(root)
            if has_image_extension(root):
                counts.listed += 1
                yield root, int(info.get("size") or 0)
            else:
                counts.skipped_by_extension += 1
            return
        if not fs.isdir(root):
            raise InputError(f"input not found: {to_uri(fs, root)}")
        for dirpath, dirnames, files in fs.walk(root, detail=True):
            # fs.walk descends into what is left in ``dirnames``: sort it in place so the
            # listing order (and so --limit) is the same on every run.
            ordered = {name: dirnames[name] for name in sorted(dirnames)}
            dirnames.clear()
            dirnames.update(ordered)
            for name in sorted(files):
                info = files[name]
                if info.get("type", "file") != "file":
                    continue
                if not has_image_extension(name):
                    counts.skipped_by_extension += 1
                    continue
                counts.listed += 1
                yield f"{dirpath.rstrip('/')}/{name}", int(info.get("size") or 0)
    except PermissionError as exc:
        raise InputError(
            f"cannot list input {to_uri(fs, root)}: permission denied ({exc})"
        ) from None
    except FileNotFoundError:
        raise InputError(f"input not found: {to_uri(fs, root)}") from None


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
        ``file_size``.

    Example:
        >>> import fsspec, tempfile
        >>> counts = ListingCounts()
        >>> list(list_images(fsspec.filesystem("file"), tempfile.mkdtemp(), counts, chunk_rows=8))
        []
    """
    uris: list[str] = []
    paths: list[str] = []
    sizes: list[int] = []
    taken = 0
    for path, size in iter_image_files(fs, root, counts):
        uris.append(to_uri(fs, path))
        paths.append(path)
        sizes.append(size)
        taken += 1
        if len(uris) >= chunk_rows:
            yield _chunk(uris, paths, sizes)
            uris, paths, sizes = [], [], []
        if limit is not None and taken >= limit:
            break
    if uris:
        yield _chunk(uris, paths, sizes)


def _chunk(uris: list[str], paths: list[str], sizes: list[int]) -> pa.Table:
    return pa.table(
        [pa.array(uris, pa.string()), pa.array(paths, pa.string()), pa.array(sizes, pa.int64())],
        schema=LISTING_SCHEMA,
    )
