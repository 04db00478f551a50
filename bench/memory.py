"""Target 3: peak resident memory of a whole run (driver and every Ray worker) at 10x the images
against 1x: streaming, no materialization, a bounded object store.

    python -m bench.memory --images 48 --factor 10
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench.corpus import make_corpus
from bench.results import append, embed_command, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--kind", default="mixed")
    parser.add_argument("--run-args", default="")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    results = []
    try:
        for count in (args.images, args.images * args.factor):
            make_corpus(args.kind, work / f"in{count}", count=count)
            command = embed_command(work / f"in{count}", work / f"out{count}", args.run_args)
            wall, peak, _ = run_measured(command)
            results.append((count, wall, peak))
            print(f"{count} images: {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (n1, w1, p1), (n10, w10, p10) = results
    lines = [
        "| images | wall | peak RSS (driver + Ray workers) |",
        "| --- | --- | --- |",
        f"| {n1} ({args.kind}) | {w1:.1f} s | {p1 / 2**20:.0f} MiB |",
        f"| {n10} ({args.kind}) | {w10:.1f} s | {p10 / 2**20:.0f} MiB |",
        "",
        f"Ratio of peaks: **{p10 / p1:.2f}** (target <= 1.25). Run flags: `{args.run_args or '(defaults)'}`.",
    ]
    if args.no_append:
        print("\n".join(lines))
    else:
        append(f"Target 3: memory at {args.factor}x the images", lines)


if __name__ == "__main__":
    main()
