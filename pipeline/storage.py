"""Every byte in and out goes through fsspec: local folders, ``file://``, ``s3://`` (s3fs), etc."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Options such as endpoint_url only make sense for object stores; passing them to the local
# filesystem would fail, so they are applied to these protocols alone.
_OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})


def open_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """Resolve a URI to ``(filesystem, path)``.

    Args:
        uri: A local path, ``file://`` or any fsspec URL.
        storage_options: fsspec options, applied to object stores only.

    Returns:
        The filesystem (cached by fsspec, so cheap to call per batch) and the path on it,
        without protocol and without a trailing slash.

    Example:
        >>> fs, path = open_fs("/tmp/photos/")
        >>> path
        '/tmp/photos'
    """
    protocol = fsspec.utils.get_protocol(uri)
    options = dict(storage_options or {}) if protocol in _OBJECT_STORE_PROTOCOLS else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/") or path


def is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_uri(fs: Any, path: str) -> str:
    """The public URI of a path: an absolute path for local files, ``proto://path`` otherwise."""
    if is_local(fs):
        return path
    return str(fs.unstrip_protocol(path))


def join(root: str, *parts: str) -> str:
    """Join path parts with ``/`` (fsspec paths use ``/`` on every store)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
