"""The option values that are more than a number or a word: sizes, JSON, actor counts. Each
parser raises ``ValueError`` saying what is wrong with the text (the option's name is added
by whoever reports it)."""

from __future__ import annotations

import json
import re
from typing import Any


def parse_byte_size(text: str) -> int:
    """``2147483648``, ``2GiB``, ``512MiB``, ``2GB``: a size in bytes.

    Example:
        >>> parse_byte_size("512MiB")
        536870912
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size: give bytes or e.g. 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale |= {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(number * scale[unit])


def parse_json_object(text: str) -> dict[str, Any]:
    """A JSON object, as ``--storage-options`` takes it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    return value


def check_concurrency(value: int | tuple[int, int]) -> None:
    """``N`` actors, or an autoscaling ``(MIN, MAX)``."""
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{value}: must be >= 1")
        return
    if len(value) != 2 or not 1 <= value[0] <= value[1]:
        raise ValueError(f"{value}: give N or MIN,MAX with 1 <= MIN <= MAX")


def parse_concurrency(text: str) -> int | tuple[int, int]:
    """Parse ``N`` or ``MIN,MAX`` as given on the command line.

    Example:
        >>> parse_concurrency("1,4")
        (1, 4)
    """
    try:
        numbers = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"{text!r}: give N or MIN,MAX (integers)") from None
    if len(numbers) not in (1, 2):
        raise ValueError(f"{text!r}: give N or MIN,MAX")
    value = numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])
    check_concurrency(value)
    return value
