"""Logging for the entry points: our own loggers at ``--log-level``, libraries at WARNING, and
every known credential replaced by ``***`` in whatever is logged."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

SECRET_OPTION_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "session_token",
        "access_key",
        "secret_key",
    }
)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def secret_values(storage_options: Mapping[str, Any], environ: Mapping[str, str]) -> set[str]:
    """Every credential this process could print: storage options and the AWS env vars."""
    found: set[str] = set()

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k).lower())
        elif isinstance(value, str) and key in SECRET_OPTION_KEYS and len(value) >= 4:
            found.add(value)

    walk(storage_options)
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
) -> None:
    """One stderr handler that redacts the credentials of ``storage_options`` and ``environ``."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secret_values(storage_options, environ)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries (botocore logs request headers at DEBUG) stay at WARNING whatever --log-level.
    root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(level)
    logging.getLogger("jobs").setLevel(level)
