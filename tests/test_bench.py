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


def test_efficiency_reads_a_runs_steady_state_off_its_progress_bar() -> None:
    """``bench.efficiency`` times each new count the run's bar shows (redrawn with ``\\r``,
    as into a terminal), and takes the rate between two shares of the total."""
    from bench.efficiency import rate_between, run_counted

    script = (
        "import sys\n"
        "assert sys.argv[1:] == ['--progress', 'bar']\n"
        "for done in (0, 0, 10, 10, 50, 90, 100):\n"
        "    sys.stderr.write(f'\\r{done:,}/100 images ({done}%) · 1.0 images/s\\033[K')\n"
        "sys.stderr.write('\\nsummary line\\n')\n"
    )
    wall, points = run_counted([sys.executable, "-c", script])
    assert [(done, total) for _, done, total in points] == [
        (0, 100), (10, 100), (50, 100), (90, 100), (100, 100)
    ]  # fmt: skip
    assert wall >= points[-1][0] >= points[0][0] >= 0
    shown = [
        (0.0, 0, 1000),
        (1.0, 100, 1000),
        (2.0, 300, 1000),
        (9.0, 950, 1000),
        (9.5, 1000, 1000),
    ]
    assert rate_between(shown, 0.15, 0.97) == (950 - 300) / (9.0 - 2.0)
