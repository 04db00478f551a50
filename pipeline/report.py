"""What a run tells its operator: the summary and the runs as text, and the run report
(``OUTPUT/_reports/RUN_ID.json`` and ``.html``) as data."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING, Any, TextIO

from pipeline.config import PROG
from pipeline.failures import Failures
from pipeline.manifest import Manifest, RunRecord
from pipeline.probe import describe_probe
from pipeline.quality import describe
from pipeline.storage import mask_options, one_line

if TYPE_CHECKING:
    from pipeline.checks import Run
    from pipeline.incremental import NewImages
    from pipeline.sink import RunSink

logger = logging.getLogger(__name__)

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


def print_summary(
    run: RunRecord, output: str, out: TextIO | None = None, *, report: str | None = None
) -> None:
    """The lines a committed run prints: its counts, times, where the table and report are."""
    out = out or sys.stdout
    counts = run.counts
    rows: list[tuple[str, Any]] = [("run", run.run_id), ("listed", counts.listed)]
    if counts.skipped_by_extension:
        rows.append(("skipped", f"{counts.skipped_by_extension} (not image extensions)"))
    rows += [
        ("unchanged", f"{counts.unchanged} (already embedded)"),
        ("embedded", counts.embedded),
        *([("reused", reused_line(counts.reused, counts.embedded))] if counts.reused else []),
        ("failed", f"{counts.failed}" + (f" (see {output}/errors)" if counts.failed else "")),
        *_by_type(run.failures),
    ]
    if counts.known_failed:
        rows.append(("known bad", f"{counts.known_failed} (failed in earlier runs, not retried)"))
        rows += _by_type(run.known_failures)
    vectors = describe(run.quality)
    rows += [
        ("deleted", f"{counts.deleted} (gone from the input)"),
        *([("vectors", vectors)] if vectors else []),
        *([("probe", probe)] if (probe := describe_probe(run.quality.get("probe") or {})) else []),
        ("wall time", f"{run.wall_seconds:.1f} s"),
        (
            "images/s",
            f"{run.images_per_second:.2f} over the wall time, "
            f"{run.embedding_images_per_second:.2f} while embedding",
        ),
        ("table", f"{output}/embeddings  (manifest: {output}/_manifest.json)"),
    ]
    if report:
        rows.append(("report", report))
    print(f"{PROG}: committed", file=out)
    for key, value in rows:
        print(f"  {key:<10} {value}", file=out)


def reused_line(reused: int, embedded: int) -> str:
    """``12 of the embedded (40%): their bytes were in the table, vectors copied``."""
    share = f" ({reused / embedded:.0%})" if embedded else ""
    return f"{reused} of the embedded{share}: their bytes were in the table, vectors copied"


def print_dry_run(dry: DryRun, out: TextIO | None = None) -> None:
    """What a run would do, from :func:`pipeline.run.dry_run`."""
    from pipeline.progress import format_seconds

    out = out or sys.stdout
    listing = dry.listing
    rows: list[tuple[str, Any]] = [
        ("listed", listing.counts.listed),
        ("to embed", f"{listing.to_embed} (new or changed)"),
        ("unchanged", f"{listing.unchanged} (already embedded)"),
        ("known bad", f"{listing.known_failed} (failed in earlier runs, not retried)"),
        *_by_type(listing.known_failures),
        ("deleted", f"{len(listing.deleted)} (gone from the input)"),
    ]
    if listing.counts.skipped_by_extension:
        rows.insert(1, ("skipped", f"{listing.counts.skipped_by_extension} (not image extensions)"))
    if dry.seconds_per_image is not None:
        eta = listing.to_embed * dry.seconds_per_image
        rows.append(
            ("eta", f"{format_seconds(eta)} of embedding at the last run's rate, plus start-up")
        )
    if dry.refusal:
        rows.append(("would stop", dry.refusal))
    print(f"{PROG}: dry run: nothing was embedded or written", file=out)
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
                # A run killed between checkpoints stays "checkpointed": say how far it got.
                f"{run.status} ({run.checkpoints + 1})"
                if run.status == "checkpointed"
                else run.status,
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


# -- the run report: OUTPUT/_reports/RUN_ID.json and .html ----------------------------------

SAMPLE_SECONDS = 10.0


def throughput_samples(
    written: Sequence[tuple[float, int]], seconds: float, every: float = SAMPLE_SECONDS
) -> list[dict[str, float]]:
    """Images written per interval of the execution, from the writer tasks' finish times.

    Args:
        written: ``(seconds since execution started, images)`` per writer task.
        seconds: How long the execution took.
        every: Interval length.

    Example:
        >>> [s["images_per_second"] for s in throughput_samples([(1.0, 10), (12.0, 30)], 15.0)]
        [1.0, 6.0]
    """
    if not written:
        return []
    end = max(seconds, max(t for t, _ in written))
    images = [0] * max(1, math.ceil(end / every))
    for t, count in written:
        images[min(int(t // every), len(images) - 1)] += count
    samples = []
    for i, count in enumerate(images):
        until = min((i + 1) * every, end)
        span = max(until - i * every, 1e-9)
        samples.append(
            {"t": round(until, 3), "images": count, "images_per_second": round(count / span, 3)}
        )
    return samples


def write_run_report(run: Run, sink: RunSink, timings: dict[str, float]) -> None:
    """``OUTPUT/_reports/RUN_ID.json`` and ``.html``; a report that cannot be written is a
    warning, never a failed run (the run has committed by then)."""
    assert sink.record is not None
    report = run_report(
        sink.record,
        output=run.output.uri,
        config=config_for_report(run.config),
        timings=timings | sink.timings,
        throughput=throughput_samples(sink.written, sink.timings.get("execution", 0.0)),
    )
    try:
        run.output.write_report(sink.record.run_id, report, report_html(report))
    except OSError as exc:
        logger.warning("run report not written: %s", one_line(exc))


def run_report(
    run: RunRecord,
    *,
    output: str,
    config: Mapping[str, Any],
    timings: Mapping[str, float],
    throughput: Sequence[Mapping[str, float]],
) -> dict[str, Any]:
    """The run report: the run's record, and what only the report keeps (config, timings,
    throughput over time, versions, host)."""
    import platform
    import socket
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("embed-images", "ray", "torch", "torchvision", "pyarrow", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    record = run.to_json()
    record.pop("files", None)  # the manifest lists them
    return {
        "format": "embed-images/run-report",
        "output": output,
        "run": record,
        "stage_seconds": {k: round(v, 3) for k, v in timings.items()},
        "throughput": list(throughput),
        "config": dict(config),
        "versions": versions,
        "host": {"name": socket.gethostname(), "cpus": os.cpu_count()},
    }


def config_for_report(config: Any) -> dict[str, Any]:
    """The run's ``EmbedConfig`` as JSON: credentials in ``storage_options`` masked, URLs
    without user info or query string (:func:`pipeline.storage.mask_options`)."""
    values = dataclasses.asdict(config)
    masked: dict[str, Any] = mask_options(values)
    masked["storage_options"] = mask_options(values.get("storage_options") or {}, "")
    return masked


def report_html(report: Mapping[str, Any]) -> str:
    """One self-contained page (no scripts, no fetches): what made the vectors, the images
    written over time, the stages, the counts, and this run's failures apart from the known
    ones earlier runs recorded."""
    run = report["run"]
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{v:,}</td></tr>" for k, v in run["counts"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>embed-images run {escape(run["run_id"])}</title>
<style>body{{font:14px sans-serif;margin:2em;max-width:60em}}
td,th{{padding:2px 10px;text-align:left}}table{{border-collapse:collapse}}
tr:nth-child(even){{background:#f3f3f3}}.warn{{color:#b42318;font-weight:bold}}
svg text{{font:11px sans-serif}}</style></head>
<body><h1>Run {escape(run["run_id"])}: {escape(run["status"])}</h1>
<p>{escape(run["input"])} &rarr; {escape(report["output"])}; {run["wall_seconds"]:.1f} s,
{run["images_per_second"]:.2f} images/s over the wall time,
{run.get("embedding_images_per_second", 0):.2f} while embedding.</p>
{_made_with(report)}
<h2>Images written</h2>{_chart(report["throughput"])}
<h2>Stages</h2>{_timeline(report["stage_seconds"])}
<h2>Counts</h2><table>{rows}</table>
<h2>Reuse by content</h2><p>{escape(_reuse(report))}</p>
<h2>Vectors</h2><p>{escape(describe(run.get("quality") or {}) or "none written")}</p>
<p>Quality gate: {escape(_gate(report))}</p>
<p>Probe: {escape(_probe(run.get("quality") or {}))}</p>
<h2>This run's failures</h2>{_failure_table(run.get("failures", {}))}
<h2>Known failures</h2><p>Images earlier runs failed on for a lasting reason, unchanged since:
not read again.</p>{_failure_table(run.get("known_failures", {}))}
</body></html>
"""


def _gate(report: Mapping[str, Any]) -> str:
    if report.get("config", {}).get("gate", "on") == "off":
        return "off (--gate off): non-finite vectors and a failed probe are committed"
    return "on: a non-finite vector or a probe beyond tolerance commits nothing new (exit 4)"


def _probe(quality: Mapping[str, Any]) -> str:
    return describe_probe(quality.get("probe") or {}) or (
        "none (a new table, --probe 0, or nothing new to embed)"
    )


def _reuse(report: Mapping[str, Any]) -> str:
    """How many images' vectors were copied from the table, found by their bytes."""
    counts, mode = report["run"]["counts"], report.get("config", {}).get("reuse", "off")
    if mode == "off":
        return "off (--reuse off): every new image was embedded"
    how = "by single-part ETag or sha256" if mode == "etag" else "by sha256"
    reused, embedded = counts.get("reused", 0), counts.get("embedded", 0)
    return f"{reused_line(reused, embedded)} (found {how})."


def _made_with(report: Mapping[str, Any]) -> str:
    """What made the vectors: model, weights (random ones flagged), precision, device,
    preprocessing and version."""
    run, config = report["run"], report.get("config", {})
    model = run.get("model") or {}
    weights = str(model.get("weights", config.get("weights", "?")))
    flag = (
        ' <span class="warn">seeded random weights: these vectors are for testing, not for '
        "search</span>"
        if weights.startswith("random")
        else ""
    )
    sha = str(model.get("weights_sha256", ""))
    items = {
        "model": f"{model.get('name', 'resnet50')}, {model.get('embedding_dim', '?')}-d "
        f"{model.get('embedding_dtype', '')}"
        + (", L2-normalized" if model.get("normalized") else ""),
        "weights": f"{escape(weights)} (sha256 {escape(sha[:12])}…){flag}",
        "precision": model.get("precision", "?"),
        "decode": config.get("decode_device", "?"),
        "resize": (run.get("preprocessing") or {}).get("mode", "?"),
        "embed-images": report.get("versions", {}).get("embed-images", "?"),
    }
    cells = "".join(
        f"<tr><th>{name}</th><td>{value if name == 'weights' else escape(str(value))}</td></tr>"
        for name, value in items.items()
    )
    return f"<h2>Made with</h2><table>{cells}</table>"


def _failure_table(failures: Mapping[str, Failures]) -> str:
    if not failures:
        return "<p>none</p>"
    rows = "".join(
        f"<tr><td>{escape(kind)}</td><td>{f['count']:,}</td><td>{escape(f['example_uri'])}</td>"
        f"<td>{escape(f.get('example_message', ''))}</td></tr>"
        for kind, f in sorted(failures.items(), key=lambda item: -item[1]["count"])
    )
    return (
        "<table><tr><th>type</th><th>images</th><th>example</th><th>message</th></tr>"
        f"{rows}</table>"
    )


def _ticks(top: float, n: int = 4) -> list[float]:
    """About ``n`` round tick values from 0 to at least ``top``."""
    raw = max(top, 1e-9) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _chart(samples: Sequence[Mapping[str, float]], width: int = 640, height: int = 220) -> str:
    """Images written so far over the seconds of the execution, with labelled axes, as inline
    SVG (the slope is the rate)."""
    if not samples:
        return "<p>no images were written</p>"
    points = [(0.0, 0)]
    for sample in samples:
        points.append((sample["t"], points[-1][1] + int(sample["images"])))
    xs, ys = _ticks(points[-1][0]), _ticks(points[-1][1])
    left, right, top, bottom = 60, width - 20, 10, height - 40

    def x(t: float) -> float:
        return left + (right - left) * t / xs[-1]

    def y(images: float) -> float:
        return bottom - (bottom - top) * images / ys[-1]

    grid = "".join(
        f'<line x1="{left}" y1="{y(v):.1f}" x2="{right}" y2="{y(v):.1f}" stroke="#e5e5e5"/>'
        f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:,.0f}</text>'
        for v in ys
    ) + "".join(
        f'<text x="{x(v):.1f}" y="{bottom + 16}" text-anchor="middle">{v:g}</text>' for v in xs
    )
    line = " ".join(f"{x(t):.1f},{y(n):.1f}" for t, n in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{grid}'
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>'
        f'<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{line}"/>'
        f'<text x="{(left + right) / 2}" y="{height - 6}" text-anchor="middle">'
        "seconds since the execution started</text>"
        f'<text transform="translate(14,{(top + bottom) / 2}) rotate(-90)" '
        'text-anchor="middle">images written</text></svg>'
    )


def _timeline(stages: Mapping[str, float], width: int = 640) -> str:
    """The run's stages one after another, as a bar of their seconds, with a legend."""
    total = sum(stages.values())
    if total <= 0:
        return "<p>no stage took measurable time</p>"
    colours = ("#8da0cb", "#66c2a5", "#1f6feb", "#fc8d62", "#e78ac3")
    bars, legend, at = [], [], 0.0
    for i, (name, seconds) in enumerate(stages.items()):
        colour, w = colours[i % len(colours)], (width - 2) * seconds / total
        bars.append(
            f'<rect x="{1 + at:.1f}" y="1" width="{max(w, 0.5):.1f}" height="22" '
            f'fill="{colour}"><title>{escape(name)}: {seconds:.1f} s</title></rect>'
        )
        legend.append(f'<span style="color:{colour}">&#9632;</span> {escape(name)} {seconds:.1f} s')
        at += w
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="24">{"".join(bars)}'
        f"</svg><p>{' &nbsp; '.join(legend)}</p>"
    )


@dataclasses.dataclass(frozen=True)
class DryRun:
    """What a run would do: counts, an estimate, and what it would refuse."""

    listing: NewImages
    seconds_per_image: float | None  # the last committed run's, while embedding
    refusal: str | None  # the run would stop here, with this line
