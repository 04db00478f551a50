"""The run report: the page an operator opens, checked as data and, where Chromium is installed,
rendered."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.embed import ModelIdentity
from pipeline.manifest import RunCounts, RunRecord
from pipeline.probe import ProbeResult, probe_verdict
from pipeline.report import report_html, run_report, throughput_samples


def _report(weights: str = "random:seed=0") -> dict[str, Any]:
    record = RunRecord(
        run_id="20261205T000000Z-abcdef",
        input="/in",
        counts=RunCounts(listed=40, unchanged=10, known_failed=2, embedded=25, failed=3),
        model=ModelIdentity(
            weights=weights, weights_sha256="ab" * 32, normalized=True, precision="bf16"
        ),
        preprocessing={"mode": "center-crop"},
        wall_seconds=12.0,
        images_per_second=2.3,
        failures={"truncated": {"count": 3, "example_uri": "/in/cut.jpg", "example_message": "x"}},
        known_failures={
            "not_an_image": {"count": 2, "example_uri": "/in/old.txt.jpg", "example_message": ""}
        },
        quality={"vectors": 25, "non_finite": 0, "zero": 1, "norm": {"p1": 1, "p50": 1, "p99": 1}},
    )
    written = [(1.0, 8), (2.5, 8), (4.0, 8), (6.0, 4)]
    return run_report(
        record,
        output="/out",
        config={"weights": weights, "decode_device": "cpu"},
        timings={"start-up": 3.0, "listing": 0.5, "execution": 6.0, "commit": 0.4},
        throughput=throughput_samples(written, 6.0),
    )


def test_the_report_says_what_made_the_vectors_and_flags_random_weights() -> None:
    page = report_html(_report())
    made = page[page.index("<h2>Made with</h2>") : page.index("<h2>Images written</h2>")]
    for shown in ("resnet50", "2048-d", "L2-normalized", "bf16", "center-crop", "abababababab"):
        assert shown in made, shown
    assert "seeded random weights" in made
    imagenet = report_html(_report(weights="imagenet:IMAGENET1K_V2"))
    assert "IMAGENET1K_V2" in imagenet and "seeded random weights" not in imagenet


def test_the_report_gives_the_vectors_statistics_the_gate_and_the_probe() -> None:
    report = _report()
    page = report_html(report)
    vectors = page[page.index("<h2>Vectors</h2>") : page.index("<h2>This run's failures")]
    assert "0 non-finite, 1 all-zero of 25; L2 norm p1 / p50 / p99 1 / 1 / 1" in vectors
    assert "Quality gate: on: " in vectors and "Probe: none (a new table" in vectors
    report["config"]["gate"] = "off"
    results: list[ProbeResult] = [
        {"uri": "/in/a.jpg", "error": 2e-3, "why": ""},
        {"uri": "/in/b.jpg", "error": None, "why": "changed since"},
    ]
    report["run"]["quality"]["probe"] = probe_verdict(results, 1e-3)
    page = report_html(report)
    assert "Quality gate: off (--gate off)" in page
    assert (
        "Probe: 2 stored images picked, 1 compared, 1 skipped (unreadable or changed since): "
        "max relative error 0.002 (/in/a.jpg); tolerance 0.001, FAILED"
    ) in page


def test_this_runs_failures_are_apart_from_the_known_ones() -> None:
    page = report_html(_report())
    own = page[page.index("<h2>This run's failures</h2>") : page.index("<h2>Known failures")]
    known = page[page.index("<h2>Known failures") :]
    assert "truncated" in own and "not_an_image" not in own
    assert "not_an_image" in known and "truncated" not in known


def test_the_chart_counts_images_over_time_on_labelled_axes() -> None:
    page = report_html(_report())
    chart = page[page.index("<h2>Images written</h2>") : page.index("<h2>Stages</h2>")]
    assert "seconds since the execution started" in chart and "images written" in chart
    points = re.search(r'<polyline[^>]* points="([^"]+)"', chart)
    assert points is not None
    ys = [float(p.split(",")[1]) for p in points.group(1).split()]
    assert ys == sorted(ys, reverse=True)  # cumulative: never goes down (SVG y grows down)
    labels = re.findall(r'text-anchor="end">([\d,]+)</text>', chart)
    assert int(labels[-1].replace(",", "")) >= 28  # the y axis reaches every image written
    stages = page[page.index("<h2>Stages</h2>") : page.index("<h2>Counts</h2>")]
    assert all(f"{name} " in stages for name in ("start-up", "listing", "execution", "commit"))
    assert not re.search(r"<script|<link|src=|href=|url\(", page)  # self-contained


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine")
def test_the_report_renders_in_a_browser(tmp_path: Path) -> None:
    """The page as a browser draws it: a screenshot an operator would see (kept for a look)."""
    page = tmp_path / "report.html"
    page.write_text(report_html(_report()))
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=900,1400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a page, not a blank
