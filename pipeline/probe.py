"""The probe: a run re-embeds a few images its table holds and compares the vectors it gets
with the stored ones, before it commits anything (part of the quality gate).

A library upgrade that changed resizing, another GPU's numerics or a corrupted model give
vectors the weights' sha256 cannot catch; re-embedding stored images can. The probe picks
``--probe`` rows deterministically across the runs of the table's current files
(:func:`pick_probes`: across runs and files, newest runs first, rows by a hash of their URI), and
puts them first in the run's own stream, so no model actor starts twice. The decode stage
reads and decodes them as any image (never reused by content); the writer does not write
them, but compares (:func:`compare_probes`): a probe whose bytes changed since (its sha256 is
not the stored one's) or that cannot be read is skipped. The sink commits nothing until every
probe is back; one beyond ``--probe-tolerance`` stops the run (exit 4).

The error of a probe is the relative L2 distance ``|new - stored| / |stored|``.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa

from pipeline.listing import LISTING_SCHEMA
from pipeline.manifest import Manifest, run_of
from pipeline.reuse import CONTENT_COLUMN, CONTENT_TYPE, read_columns, read_rows
from pipeline.storage import join, open_fs

# Default tolerances of the relative L2 error, by the precision the vectors were computed in
# (bench/probe.py measures what the same configuration and what changes give).
TOLERANCES = {"fp32": 1e-3, "bf16": 1e-2, "fp16": 1e-2}


@dataclasses.dataclass(frozen=True)
class Probe:
    """One stored row to re-embed: its key as listed, where it lies, and its digest."""

    uri: str
    path: str  # on the input's filesystem
    file_size: int
    source_version: str
    file: str  # the table file holding it, relative to the output
    row: int  # its row in that file
    digest: bytes
    stored: tuple[float, ...]  # its stored vector, read when picked


class ProbeResult(TypedDict):
    uri: str
    error: float | None  # None: skipped
    why: str  # why it was skipped; "" if compared


def pick_probes(
    uri: str, manifest: Manifest, n: int, storage_options: Mapping[str, Any] | None = None
) -> list[Probe]:
    """Up to ``n`` rows of the table's current files: up to ``n`` files, taken from the runs
    in turn (newest first; a run's files by a hash of their path), and in each file the rows
    with the smallest hash of their URI, taken a file at a time in turn. So the probe spans
    runs and files (one folder moved away leaves most probes readable) and reads narrow
    columns of ``n`` files at most. Rows without a digest (written before ``content_sha256``)
    are not picked."""
    files = manifest.current.get("embeddings", [])
    if n <= 0 or not files:
        return []
    by_run: dict[str, list[str]] = {}
    for path in files:
        by_run.setdefault(run_of(path) if "/run_id=" in path else "", []).append(path)
    runs = [r for r in reversed(manifest.commit_order()) if r in by_run]
    runs += [r for r in by_run if r not in runs]
    per_run = [sorted(by_run[r], key=lambda p: zlib.crc32(p.encode())) for r in runs]
    depth = max(map(len, per_run))
    picked_files = [f[k] for k in range(depth) for f in per_run if k < len(f)][:n]
    fs, root = open_fs(uri, storage_options or {})
    schema = pa.schema(
        [
            pa.field("uri", pa.string()),
            pa.field("file_size", pa.int64()),
            pa.field("source_version", pa.string()),
            pa.field(CONTENT_COLUMN, CONTENT_TYPE),
        ]
    )
    queues = []
    for path in picked_files:
        rows = read_columns(fs, join(root, path), schema).to_pylist()
        order = sorted(
            (zlib.crc32(str(r["uri"]).encode()), i)
            for i, r in enumerate(rows)
            if r[CONTENT_COLUMN] is not None
        )
        queues.append([(path, i, rows[i]) for _, i in order])
    chosen: list[tuple[str, int, dict[str, Any]]] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    # The stored vectors are read now, from the run's snapshot: the writers compare against
    # them even if a compaction removes these files while the run goes on.
    vectors: dict[tuple[str, int], tuple[float, ...]] = {}
    for path in sorted({path for path, _, _ in chosen}):
        rows = np.asarray(sorted(i for p, i, _ in chosen if p == path), dtype=np.int64)
        stored = read_rows(fs, join(root, path), rows)["embedding"].to_pylist()
        vectors |= {(path, int(i)): tuple(v) for i, v in zip(rows, stored, strict=True)}
    return [
        Probe(
            uri=row["uri"],
            path=_path(row["uri"]),
            file_size=row["file_size"],
            source_version=row["source_version"],
            file=path,
            row=i,
            digest=row[CONTENT_COLUMN],
            stored=vectors[(path, i)],
        )
        for path, i, row in chosen
    ]


def _path(uri: str) -> str:
    """A listed URI's path on its filesystem: a store's drops ``proto://``."""
    return uri.split("://", 1)[1] if "://" in uri and not uri.startswith("file://") else uri


def probe_chunk(probes: Sequence[Probe]) -> pa.Table:
    """The probes as listing rows, to go first into the run's stream."""
    return pa.table(
        {
            "uri": [p.uri for p in probes],
            "path": [p.path for p in probes],
            "file_size": [p.file_size for p in probes],
            "source_version": [p.source_version for p in probes],
        },
        schema=LISTING_SCHEMA,
    )


def probe_rows(batch: Mapping[str, np.ndarray], probes: Sequence[Probe]) -> np.ndarray:
    """Which rows of a batch are probes: their ``(uri, source_version)`` is a probe's (a
    changed image's new row has another version)."""
    keys = {(p.uri, p.source_version) for p in probes}
    return np.asarray(
        [
            (str(u), str(v)) in keys
            for u, v in zip(batch["uri"], batch["source_version"], strict=True)
        ],
        dtype=bool,
    )


def compare_probes(
    batch: Mapping[str, np.ndarray],
    rows: np.ndarray,
    probes: Sequence[Probe],
) -> list[ProbeResult]:
    """Each probe row of the batch (``rows``) against its stored vector (read when picked)."""
    by_key = {(p.uri, p.source_version): p for p in probes}
    results: list[ProbeResult] = []
    for i in np.flatnonzero(rows):
        probe = by_key[(str(batch["uri"][i]), str(batch["source_version"][i]))]
        if batch["error_type"][i]:
            results.append({"uri": probe.uri, "error": None, "why": str(batch["error_type"][i])})
            continue
        if bytes(batch[CONTENT_COLUMN][i]) != probe.digest:
            results.append({"uri": probe.uri, "error": None, "why": "changed since"})
            continue
        before = np.asarray(probe.stored, dtype=np.float64)
        after = np.asarray(batch["embedding"][i], dtype=np.float64)
        scale = float(np.linalg.norm(before)) or 1.0
        error = float(np.linalg.norm(after - before) / scale)
        results.append(
            {"uri": probe.uri, "error": error if np.isfinite(error) else float("inf"), "why": ""}
        )
    return results


def probe_verdict(results: Sequence[ProbeResult], tolerance: float) -> dict[str, Any]:
    """What the run records of its probe: images, compared, skipped, the worst error and
    image, the tolerance, and ``passed``."""
    compared = [r for r in results if r["error"] is not None]
    worst = max(compared, key=lambda r: r["error"] or 0.0, default=None)
    return {
        "images": len(results),
        "compared": len(compared),
        "skipped": len(results) - len(compared),
        "max_error": worst["error"] if worst else None,
        "worst": worst["uri"] if worst else None,
        "tolerance": tolerance,
        "passed": worst is None or (worst["error"] or 0.0) <= tolerance,
    }


def describe_probe(verdict: Mapping[str, Any]) -> str:
    """``32 stored images picked, 30 compared, 2 skipped (unreadable or changed since): max
    relative error 2.1e-07 (URI); tolerance 0.001, passed``."""
    if not verdict:
        return ""
    text = f"{verdict['images']} stored images picked, {verdict['compared']} compared"
    if verdict["skipped"]:
        text += f", {verdict['skipped']} skipped (unreadable or changed since)"
    if verdict["max_error"] is not None:
        text += f": max relative error {verdict['max_error']:.2g} ({verdict['worst']})"
    passed = "passed" if verdict["passed"] else "FAILED"
    return f"{text}; tolerance {verdict['tolerance']:g}, {passed}"
