"""The prepared GPU bench stays runnable: its quick mode, on this machine's CPU (smoke test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick_gpu_bench_on_cpu(results: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench.gpu --quick --device cpu`` writing its block to ``results``."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu",
            "--quick",
            "--device",
            "cpu",
            *extra,
            "--results",
            str(results),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_gpu_bench_quick_runs_to_the_end_on_cpu(tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    done = run_quick_gpu_bench_on_cpu(results)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = results.read_text()
    assert "failed:" not in text, text
    for section in ("### Agreement", "### Model-only ceiling", "### End to end", "cores"):
        assert section in text
    # Every end-to-end path measured a rate (none skipped for want of time).
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| cpu decode (") or line.startswith("| CPU decode, ")
    ]
    assert len(rows) == 5 and not any("skipped" in row for row in rows), rows


def test_gpu_bench_cut_off_by_its_watchdog_keeps_what_it_measured(tmp_path: Path) -> None:
    """A section that overruns the budget (here: any, with no grace) does not hang the lent
    machine's one call: the bench writes its block so far, names the section, and exits 3."""
    results = tmp_path / "results.md"
    done = run_quick_gpu_bench_on_cpu(results, "--budget", "1", "--watchdog-grace", "0")
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    text = results.read_text()
    assert "## GPU bench (cpu, quick)" in text and "Cut off by the watchdog" in text, text
    assert "Thread" in done.stderr  # every thread's stack, for the one that stuck
