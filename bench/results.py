"""What every benchmark shares: machine facts, timing, process-tree memory, and RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def append(title: str, lines: list[str], path: Path = RESULTS) -> None:
    """Append one result block (title, date, machine, command, figures) to bench/RESULTS.md
    (or ``path``: a benchmark run elsewhere brings its block back in a file of its own)."""
    module = f"bench.{Path(sys.argv[0]).stem}"
    command = " ".join(shlex.quote(a) for a in ["python", "-m", module, *sys.argv[1:]])
    block = [
        f"## {title}",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        "",
        *lines,
        "",
    ]
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by the `bench/` scripts; newest last.\n\n")
    with path.open("a") as f:
        f.write("\n".join(block) + "\n")
    print("\n".join(block))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Ray's workers included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        stack.extend(children.get(current, []))
    return total


def embed_command(images: Path, output: Path, run_args: str = "") -> list[str]:
    """The `embed-images run` command line a benchmark times (seeded random weights)."""
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        "--input",
        str(images),
        "--output",
        str(output),
        "--weights",
        "random",
        *run_args.split(),
    ]


def run_measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, peak RSS of its whole process tree, output)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode}):\n{output[-3000:]}")
    return wall, peak, output
