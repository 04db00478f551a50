"""What the commands print: a run's summary and an output's runs, as aligned text tables."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from pipeline.manifest import Failures, Manifest, RunRecord

PROG = "embed-images"

STATUS_COLUMNS = (
    "run",
    "status",
    "finished",
    "listed",
    "unchanged",
    "embedded",
    "failed",
    "deleted",
    "images/s",
)


def print_summary(run: RunRecord, output: str, out: TextIO | None = None) -> None:
    """The lines a committed run prints: its counts, times and where the table is."""
    out = out or sys.stdout
    counts = run.counts
    rows: list[tuple[str, Any]] = [
        ("run", run.run_id),
        ("listed", counts.listed),
        ("skipped", f"{counts.skipped_by_extension} (not image extensions)"),
        ("unchanged", f"{counts.unchanged} (already embedded)"),
        ("embedded", counts.embedded),
        ("failed", f"{counts.failed}" + (f" (see {output}/errors)" if counts.failed else "")),
        *_by_type(run.failures),
    ]
    if counts.known_failed:
        rows.append(("known bad", f"{counts.known_failed} (failed in earlier runs, not retried)"))
        rows += _by_type(run.known_failures)
    rows += [
        ("deleted", f"{counts.deleted} (gone from the input)"),
        ("wall time", f"{run.wall_seconds:.1f} s"),
        (
            "images/s",
            f"{run.images_per_second:.2f} over the wall time, "
            f"{run.embedding_images_per_second:.2f} while embedding",
        ),
        ("table", f"{output}/embeddings  (manifest: {output}/_manifest.json)"),
    ]
    print(f"{PROG}: committed", file=out)
    for key, value in rows:
        print(f"  {key:<10} {value}", file=out)


def _by_type(failures: Mapping[str, Failures]) -> list[tuple[str, Any]]:
    """One indented row per error_type, most first, with an example."""
    ordered = sorted(failures.items(), key=lambda item: (-item[1]["count"], item[0]))
    return [
        ("", f"  {kind} {entry['count']}, e.g. {entry['example_uri']}") for kind, entry in ordered
    ]


def print_runs(manifest: Manifest, out: TextIO | None = None) -> None:
    """One row per recorded run, oldest first."""
    rows: list[Sequence[Any]] = [STATUS_COLUMNS]
    for run in manifest.runs:
        c = run.counts
        rows.append(
            (
                run.run_id,
                run.status,
                run.finished_at,
                *(str(v) for v in (c.listed, c.unchanged, c.embedded, c.failed, c.deleted)),
                f"{run.images_per_second:.2f}",
            )
        )
    print_table(rows, out)


def print_table(rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    """Columns padded to their widest cell, first row as the header."""
    out = out or sys.stdout
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def print_neighbours(table: Any, out: TextIO | None = None) -> None:
    """``query``'s answer: rank, distance, uri and original size, nearest first."""
    rows: list[Sequence[Any]] = [("rank", "distance", "uri", "width", "height")]
    for r in table.to_pylist():
        rows.append(
            (r["rank"], f"{r['distance']:.4f}", r["uri"], r["original_width"], r["original_height"])
        )
    print_table(rows, out)
