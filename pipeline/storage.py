"""Every byte in and out goes through fsspec: local folders, ``file://``, ``s3://`` (s3fs), etc."""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pyarrow import PythonFile
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.config import PipelineError

# Options such as endpoint_url only make sense for object stores; passing them to the local
# filesystem would fail, so they are applied to these protocols alone.
_OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})


# botocore's own defaults (60 s timeouts, 5 attempts, under s3fs's 5 tries) leave a command
# that reaches an endpoint that never answers silent for many minutes. With these, such an
# endpoint fails in about 5 tries x 2 attempts x 10 s = 100 s; ``--storage-options
# '{"config_kwargs": {...}}'`` overrides any of them.
S3_CONFIG = {
    "connect_timeout": 5,
    "read_timeout": 10,
    "retries": {"max_attempts": 2, "mode": "standard"},
}


def with_timeouts(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with ``S3_CONFIG`` under the user's own ``config_kwargs``, for s3.

    Example:
        >>> config = with_timeouts("s3", {"config_kwargs": {"read_timeout": 60}})["config_kwargs"]
        >>> config["connect_timeout"], config["read_timeout"]
        (5, 60)
    """
    options = dict(options)
    if protocol in ("s3", "s3a"):
        # A copy each time: botocore rewrites the "retries" mapping it is given.
        defaults = copy.deepcopy(S3_CONFIG)
        options["config_kwargs"] = defaults | dict(options.get("config_kwargs") or {})
    return options


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
    fs, path = fsspec.core.url_to_fs(uri, **with_timeouts(protocol, options))
    if isinstance(fs, LocalFileSystem):
        # "a/../b" and "./b" name one folder: an image's URI must not depend on the spelling.
        path = os.path.normpath(os.path.abspath(path))
    return fs, path.rstrip("/") or path


# Option names that hold credentials, by pattern: fsspec back-ends name them freely
# (``account_key``, ``sas_token``, ``client_secret``, ``connection_string``, ``password``…).
_SECRET_NAME = re.compile(
    r"key|secret|token|passw|credential|signature|sas|connection.?string|auth", re.IGNORECASE
)


def is_secret_option(name: str) -> bool:
    """True for an option name that may hold a credential.

    Example:
        >>> [is_secret_option(n) for n in ("account_key", "sas_token", "endpoint_url", "anon")]
        [True, True, False, False]
    """
    return bool(_SECRET_NAME.search(name))


def public_url(uri: str) -> str:
    """``uri`` as it may be recorded or printed: a URL without user info, query string or
    fragment (a presigned URL's signature and token live in its query); a path as it is.

    Example:
        >>> public_url("https://u:p@host/w.pth?X-Amz-Signature=abc")
        'https://host/w.pth'
    """
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def url_secrets(uri: str) -> set[str]:
    """The parts of a URL that ``public_url`` drops because they may be credentials: the
    password, the whole query string and each of its values."""
    if "://" not in uri:
        return set()
    parts = urlsplit(uri)
    found = {parts.password or "", parts.query, parts.username or ""}
    found |= {value for pair in parts.query.split("&") for value in pair.split("=", 1)[1:]}
    return {value for value in found if len(value) >= 4}


def mask_options(value: Any, name: str = "") -> Any:
    """Storage options with every credential masked (``***``), URLs made public; nested
    mappings (``client_kwargs``…) too.

    Example:
        >>> mask_options({"key": "AKIA…", "client_kwargs": {"region_name": "eu-west-1"}})
        {'key': '***', 'client_kwargs': {'region_name': 'eu-west-1'}}
    """
    if isinstance(value, Mapping):
        return {k: mask_options(v, str(k)) for k, v in value.items()}
    if name and is_secret_option(name) and value not in (None, "", False, True):
        return "***"
    return public_url(value) if isinstance(value, str) else value


def within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it, once both are real paths (symbolic links and
    ``..`` resolved): for local paths."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip("/") + "/")


# Where Ray unpacks a job's --working-dir: a new folder for each job's package.
RAY_WORKING_DIR = "/runtime_resources/working_dir_files/"


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
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        # s3fs hands options it does not know to its session, which refuses them on the
        # first request.
        from pipeline.config import ConfigError

        raise ConfigError(f"--storage-options for {uri}: {one_line(exc)}") from None
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


# s3fs words S3 throttling this way; Ray's default retried I/O errors do not match it.
RETRIED_IO_ERRORS = ("Please reduce your request rate", "SlowDown")


def is_passing(exc: BaseException) -> bool:
    """Whether an I/O error is the store asking to slow down: worth trying again later."""
    return isinstance(exc, OSError) and any(words in str(exc) for words in RETRIED_IO_ERRORS)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's text on one line, at most ``limit`` characters (its type if empty)."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


class RangedReads(FSSpecHandler):  # type: ignore[misc]
    """pyarrow's handler of an fsspec filesystem, opening files for reading without fsspec's
    read-ahead cache: each read is a GET of the bytes pyarrow asks for."""

    def open_input_file(self, path: str) -> Any:
        return PythonFile(self.fs.open(path, mode="rb", cache_type="none"), mode="r")


def arrow_filesystem(fs: Any) -> Any:
    """``fs`` for pyarrow's readers (``pyarrow.dataset``, ``ray.data.read_parquet``): local
    disk as it is; an object store through :class:`RangedReads`, so that reading a few columns
    of a Parquet file GETs those columns' byte ranges, not the whole file (s3fs otherwise
    fetches 50 MiB blocks from the first read on: ``bench/RESULTS.md``)."""
    return fs if is_local(fs) else PyFileSystem(RangedReads(fs))
