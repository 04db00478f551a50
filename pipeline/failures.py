"""Failed images, by type: how many of each kind, and one of them to look at.

A run's record, the manifest and the summary all count failures this way; the rows themselves
are in the ``errors`` table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Failed images of one kind: how many, and one of them to look at.
Failures = dict[str, Any]  # {"count": int, "example_uri": str, "example_message": str}


def failures_by_type(
    error_types: Sequence[Any], uris: Sequence[Any], messages: Sequence[Any] | None = None
) -> dict[str, Failures]:
    """``{error_type: {"count": n, "example_uri": …, "example_message": …}}``, by type.

    Example:
        >>> failures_by_type(["empty", "truncated", "empty"], ["/a", "/b", "/c"])["empty"]
        {'count': 2, 'example_uri': '/a', 'example_message': ''}
    """
    found: dict[str, Failures] = {}
    texts = messages if messages is not None else [""] * len(uris)
    for error_type, uri, message in zip(error_types, uris, texts, strict=True):
        entry = found.setdefault(
            str(error_type), {"count": 0, "example_uri": str(uri), "example_message": str(message)}
        )
        entry["count"] += 1
    return dict(sorted(found.items()))


def merge_failures(*parts: Mapping[str, Failures]) -> dict[str, Failures]:
    merged: dict[str, Failures] = {}
    for part in parts:
        for error_type, entry in part.items():
            into = merged.setdefault(error_type, dict(entry) | {"count": 0})
            into["count"] += int(entry["count"])
    return dict(sorted(merged.items()))


def count_failures(failures: Mapping[str, Failures]) -> int:
    return sum(int(entry["count"]) for entry in failures.values())


def describe_failures(failures: Mapping[str, Failures]) -> str:
    """``truncated 2, empty 1`` (most first)."""
    ordered = sorted(failures.items(), key=lambda item: (-item[1]["count"], item[0]))
    return ", ".join(f"{error_type} {entry['count']}" for error_type, entry in ordered)
