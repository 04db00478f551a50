"""Every byte in and out goes through fsspec: local folders, ``file://``, ``s3://`` (s3fs), etc."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import PipelineError

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


def make_parent(fs: Any, path: str) -> None:
    """Create the folder a file will go in, on local disk only: object stores have no folders,
    and s3fs's makedirs may try to create the bucket."""
    if is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)


def to_uri(fs: Any, path: str) -> str:
    """The public URI of a path: an absolute path for local files, ``proto://path`` otherwise."""
    if is_local(fs):
        return path
    return str(fs.unstrip_protocol(path))


def join(root: str, *parts: str) -> str:
    """Join path parts with ``/`` (fsspec paths use ``/`` on every store)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn credential and permission failures of a store into one line that says what to do."""
    try:
        yield
    except PermissionError as exc:
        raise PipelineError(f"access denied to {uri}: {one_line(exc)}") from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        # s3fs turns a throttled or failing store into an OSError once its retries are spent.
        raise PipelineError(f"storage error on {uri}: {one_line(exc)}") from None
    except Exception as exc:
        # botocore's credential errors are not OSErrors; match them by name so that this
        # module does not import botocore for local runs.
        name = type(exc).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            raise PipelineError(
                f"no usable AWS credentials for {uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role"
            ) from None
        if name in ("EndpointConnectionError", "ConnectTimeoutError"):
            raise PipelineError(f"cannot reach the store of {uri}: {one_line(exc)}") from None
        raise


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's text on one line, at most ``limit`` characters (its type if empty)."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__
