"""The vectors' statistics, and the quality gate on them.

Each writer task counts, over the vectors it writes: rows holding a non-finite value, all-zero
rows, and their L2 norms in a histogram of fixed bins (a few numbers per file, never a row). The
driver adds these up at each commit into the run's record and report: the counts, and norm
percentiles to the bins' resolution.

The gate (``--gate on``, the default): a vector with a NaN or an infinity is never committed.
The first writer task that returns one stops the run: what earlier commits kept stays (every
vector in it was finite), nothing more is committed, and the command exits 4 naming the worst
image. ``--gate off`` commits such vectors and only records their count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

# Norm histogram bins, even in log10(norm): 100 per decade, each 2.3 % wide; a percentile is
# its bin's geometric middle. Norms below 1e-6 fall in bin 0, above 1e6 in the last.
BINS_PER_DECADE = 100
LOWEST, HIGHEST = -6, 6  # decades
PERCENTILES = (1, 50, 99)


class Quality(TypedDict):
    """One writer task's vectors, as the driver adds them up (JSON: bin keys are strings)."""

    vectors: int
    non_finite: int  # rows with at least one NaN or infinity
    zero: int  # rows whose values are all zero
    norms: dict[str, int]  # histogram bin -> rows (finite rows only)
    worst: str  # the row with the most non-finite values: "URI: K of D values", or ""
    worst_values: int


def batch_quality(embeddings: np.ndarray, uris: Sequence[Any] | np.ndarray) -> Quality:
    """The statistics of one batch's vectors (rows of ``embeddings``, named by ``uris``)."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    # One pass: a row's squared norm, summed in float64 (no float32 value overflows it), is
    # finite exactly when every value of the row is.
    squares = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    finite = np.isfinite(squares)
    norms = np.sqrt(squares[finite])
    bins = np.clip(
        np.floor((np.log10(np.maximum(norms, 1e-30)) - LOWEST) * BINS_PER_DECADE),
        0,
        (HIGHEST - LOWEST) * BINS_PER_DECADE,
    ).astype(np.int64)
    keys, counts = np.unique(bins, return_counts=True)
    worst, worst_values = "", 0
    if not finite.all():
        rows = np.flatnonzero(~finite)
        bad_per_row = (~np.isfinite(vectors[rows])).sum(axis=1)
        i = int(np.argmax(bad_per_row))
        worst_values = int(bad_per_row[i])
        worst = f"{uris[rows[i]]}: {worst_values} of {vectors.shape[1]} values NaN or infinite"
    return {
        "vectors": len(vectors),
        "non_finite": int((~finite).sum()),
        "zero": int((norms == 0).sum()),
        "norms": {str(int(k)): int(c) for k, c in zip(keys, counts, strict=True)},
        "worst": worst,
        "worst_values": worst_values,
    }


def merge_quality(parts: Iterable[Quality]) -> Quality:
    """Several tasks' statistics as one."""
    total: Quality = {
        "vectors": 0,
        "non_finite": 0,
        "zero": 0,
        "norms": {},
        "worst": "",
        "worst_values": 0,
    }
    for part in parts:
        for key in ("vectors", "non_finite", "zero"):
            total[key] += part[key]  # type: ignore[literal-required]
        for bin_, count in part["norms"].items():
            total["norms"][bin_] = total["norms"].get(bin_, 0) + count
        if part["worst_values"] > total["worst_values"]:
            total["worst"], total["worst_values"] = part["worst"], part["worst_values"]
    return total


def norm_percentiles(norms: Mapping[str, int]) -> dict[str, float]:
    """``p1``, ``p50``, ``p99`` of the norms, each the geometric middle of its bin.

    Example:
        >>> norm_percentiles(batch_quality(np.full((3, 4), 0.5), ["a", "b", "c"])["norms"])
        {'p1': 1.01, 'p50': 1.01, 'p99': 1.01}
    """
    total = sum(norms.values())
    if not total:
        return {}
    ordered = sorted((int(b), c) for b, c in norms.items())
    found: dict[str, float] = {}
    for p in PERCENTILES:
        rank, seen = p / 100 * total, 0
        for bin_, count in ordered:
            seen += count
            if seen >= rank:
                middle = LOWEST + (bin_ + 0.5) / BINS_PER_DECADE
                found[f"p{p}"] = float(f"{10**middle:.3g}")
                break
    return found


def summary(quality: Quality) -> dict[str, Any]:
    """What the run's record keeps: counts and norm percentiles (no histogram)."""
    return {
        "vectors": quality["vectors"],
        "non_finite": quality["non_finite"],
        "zero": quality["zero"],
        "norm": norm_percentiles(quality["norms"]),
    }


def gate_refusal(quality: Quality) -> str | None:
    """Why the gate refuses these vectors (``None``: they pass)."""
    if not quality["non_finite"]:
        return None
    return (
        f"{quality['non_finite']} of {quality['vectors']} vectors hold NaN or infinite values "
        f"(worst: {quality['worst']})"
    )


def describe(record_quality: Mapping[str, Any]) -> str:
    """One line for the summary and the report: ``2,048 vectors · 0 non-finite · …``."""
    if not record_quality.get("vectors"):
        return ""
    norm = record_quality.get("norm") or {}
    norms = " / ".join(f"{norm[k]:g}" for k in ("p1", "p50", "p99") if k in norm)
    text = (
        f"{record_quality['non_finite']:,} non-finite, {record_quality['zero']:,} all-zero "
        f"of {record_quality['vectors']:,}"
    )
    return text + (f"; L2 norm p1 / p50 / p99 {norms}" if norms else "")
