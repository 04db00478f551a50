"""Logging for the entry points: our own loggers at ``--log-level``, libraries at WARNING,
every known credential replaced by ``***`` in whatever is logged, and Ray core's known noise
kept off the console.

Run as a script (``python -I -S pipeline/logs.py PATTERN...``), this file is the stderr filter
of :func:`native_stderr_filtered`: it imports nothing of the package, so it starts in
milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def secret_values(
    storage_options: Mapping[str, Any],
    environ: Mapping[str, str],
    urls: Sequence[str | None] = (),
) -> set[str]:
    """Every credential this process could print: storage options whose names look like
    credentials (:func:`pipeline.storage.is_secret_option`), the user info and query strings
    of ``urls`` (a presigned ``--weights`` URL), and the AWS env vars."""
    from pipeline.storage import is_secret_option, url_secrets

    found: set[str] = set()

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, str):
            if key and is_secret_option(key) and len(value) >= 4:
                found.add(value)
            found.update(url_secrets(value))

    walk(storage_options)
    for url in urls:
        found.update(url_secrets(url or ""))
    found.update(environ[name] for name in SECRET_ENV if len(environ.get(name, "")) >= 4)
    return found


class RedactSecrets(logging.Filter):
    """Replace any known credential in a log record by ``***`` (defence in depth: the pipeline
    never logs one, and third-party loggers stay at WARNING)."""

    def __init__(self, secrets: set[str]) -> None:
        super().__init__()
        self.secrets = sorted(secrets, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for secret in self.secrets:
            redacted = redacted.replace(secret, "***")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_logging(
    level: str,
    *,
    storage_options: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    urls: Sequence[str | None] = (),
) -> None:
    """One stderr handler that redacts the credentials of ``storage_options``, ``urls`` and
    ``environ``."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secret_values(storage_options, environ, urls)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries (botocore logs request headers at DEBUG) stay at WARNING whatever --log-level.
    root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(level)
    logging.getLogger("jobs").setLevel(level)
    # s3fs says at DEBUG that it retries a request; an operator should see that a store is
    # slow or failing before the command gives up, so those lines come through as warnings.
    s3fs = logging.getLogger("s3fs")
    s3fs.setLevel(logging.DEBUG)
    s3fs.filters[:] = [RetryLines()]


class RetryLines(logging.Filter):
    """Let through only s3fs's "Retryable error" lines, as one-line warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Retryable error"):
            return record.levelno >= logging.WARNING
        text = " ".join(record.getMessage().split())[:200]
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = f"object store request failed, retrying: {text}", None
        return True


# Lines of Ray core's C++ logger (ERROR level, so also on the driver's stderr) that tell the
# user nothing they can act on. Each still lands in Ray's log folder
# (``python-core-driver-*.log``); the console is spared it.
RAY_CORE_NOISE = (
    # Ray Data 2.60 passes its actor pools their map function and DataContext by object
    # reference, with restarts on (ray-project/ray#57733): core_worker.cc warns on every run.
    "has constructor arguments in the object store and max_restarts > 0",
)


def drop_lines(source: int, sink: int, patterns: Sequence[bytes]) -> None:
    """Copy ``source`` to ``sink`` until end of file, less the lines holding any of
    ``patterns``.

    Bytes pass on as they arrive, so that a progress bar's partial line shows at once. Only a
    partial line that starts with ``[``, as every Ray core log line does, waits for its end
    (or 64 KiB) before it is judged. A sink that goes away is drained into nothing, so that
    the writer never sees a broken pipe on our account.
    """
    held = b""  # a partial line that may yet be one to drop
    mid_line = False  # in a partial line already passed on
    sink_open = True

    def emit(data: bytes) -> None:
        nonlocal sink_open
        while data and sink_open:
            try:
                data = data[os.write(sink, data) :]
            except OSError:
                sink_open = False

    while chunk := os.read(source, 65536):
        data, held = held + chunk, b""
        out: list[bytes] = []
        for line in data.splitlines(keepends=True):
            if mid_line:
                out.append(line)
            elif not line.endswith((b"\n", b"\r")):
                if line.startswith(b"[") and len(line) < 65536:
                    held = line
                    break
                out.append(line)
            elif not any(pattern in line for pattern in patterns):
                out.append(line)
            mid_line = not line.endswith((b"\n", b"\r"))
        emit(b"".join(out))
    emit(held)


@contextlib.contextmanager
def native_stderr_filtered(
    enabled: bool = True, patterns: Sequence[str] = RAY_CORE_NOISE
) -> Iterator[None]:
    """Within the block, what this process writes to file descriptor 2 passes through a
    filter process that drops the lines holding ``patterns`` (:data:`RAY_CORE_NOISE`).

    Ray core's C++ logger writes its ERROR lines to the driver's stderr itself, below Python,
    so no logging setting reaches them. Python's own writes take the same path, in order.
    The filter is a child process in a session of its own: a Ctrl-C to the terminal does not
    stop it, and should this process die, it still passes on what was written. ``isatty()``
    of stderr is ``False`` within the block: ask before.
    """
    if not enabled:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), *patterns],
            stdin=read_end,
            stdout=saved,
            stderr=saved,
            start_new_session=True,
        )
    except OSError:
        for fd in (read_end, write_end, saved):
            os.close(fd)
        yield
        return
    os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the filter sees the end of its input once no one else holds it
        os.close(saved)
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # a process we started holds the pipe: the filter ends with it


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    drop_lines(0, 1, [pattern.encode() for pattern in sys.argv[1:]])
