"""SIGTERM at random moments of a run: images kept against images written before the signal.

python -m bench.drain --images 2000 --trials 4 --seed 3

Each trial starts ``embed-images run`` (seeded random weights) on a fresh output, sends it
SIGTERM at a random moment after its writers staged their first file, and counts the rows in
the files staged by then (written before the signal). Once the command exits, the manifest
says what the run kept. The goal: kept >= written in every trial. The last trial's output is
then finished by a rerun, and every image must be in it exactly once.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from bench.corpus import make_corpus
from bench.results import append, embed_command
from pipeline.read import read_embeddings, read_manifest


def staged_rows(output: str, options: dict[str, str] | None = None) -> int:
    """Rows in the embeddings and errors files a run's writers have staged so far (a file
    still being written does not count: it was not written yet)."""
    fs, root = fsspec.core.url_to_fs(output, **(options or {}))
    fs.invalidate_cache()
    rows = 0
    for path in fs.glob(f"{root}/_staging/*/*/*.parquet"):
        try:
            with fs.open(path, "rb") as f:
                rows += pq.read_metadata(f).num_rows
        except (OSError, ValueError):
            continue
    return rows


def trial(images: Path, output: Path, delay: float, args: str) -> dict[str, float | int | str]:
    """One run, stopped by SIGTERM ``delay`` seconds after its first staged file."""
    process = subprocess.Popen(
        embed_command(images, output, f"--progress none {args}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started = time.time()
    while not staged_rows(str(output)) and process.poll() is None:
        time.sleep(0.1)
    time.sleep(delay)
    if process.poll() is not None:
        return {"delay": delay, "status": f"ended first ({process.returncode})"}
    written = staged_rows(str(output))
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    manifest = read_manifest(str(output))
    record = manifest.runs[-1] if manifest is not None else None
    kept = record.counts.embedded + record.counts.failed if record is not None else 0
    return {
        "at": signalled - started,
        "delay": delay,
        "written": written,
        "kept": kept,
        "stop": time.time() - signalled,
        "status": process.returncode,
        "line": err.strip().splitlines()[-1] if err.strip() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--max-delay", type=float, default=60.0)
    parser.add_argument(
        "--run-args", default="--batch-size 16 --decode-batch-size 32 --rows-per-file 64"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="drain-") as tmp:
        root = Path(tmp)
        images = root / "images"
        make_corpus("small", images, count=args.images, seed=args.seed)
        rows = []
        for i in range(args.trials):
            output = root / f"out{i}"
            figures = trial(images, output, rng.uniform(0, args.max_delay), args.run_args)
            print(figures, flush=True)
            rows.append(figures)
        rerun = subprocess.run(
            embed_command(
                images, root / f"out{args.trials - 1}", f"--progress none {args.run_args}"
            ),
            capture_output=True,
            text=True,
        )
        uris = read_embeddings(str(root / f"out{args.trials - 1}"))["uri"].to_pylist()
        once = len(uris) == len(set(uris)) == args.images
    lines = [
        f"{args.images} small JPEGs (500x375), fp32, random weights, `{args.run_args}`, "
        "default `--drain-seconds 25`; written = rows in the files staged when the signal was "
        "sent; kept = the run's images in the manifest after it exited.",
        "",
        "| signal at (s since start) | written before it | kept | exit | stopped after (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "written" not in r:
            lines.append(f"| (none: the run {r['status']}) | | | | |")
            continue
        lines.append(
            f"| {r['at']:.0f} | {r['written']} | {r['kept']} | {r['status']} | {r['stop']:.0f} |"
        )
    measured = [r for r in rows if "written" in r]
    every = all(int(r["kept"]) >= int(r["written"]) for r in measured)
    said = [str(r["line"]) for r in measured if r.get("line")]
    lines += [
        "",
        *([f"What a stopped run said: `{said[0]}`", ""] if said else []),
        f"Every written image kept: {'yes' if every else 'NO'} ({len(measured)} trials). "
        f"The last trial's rerun: exit {rerun.returncode}, each of the {args.images} images "
        f"exactly once: {'yes' if once else 'NO'}.",
    ]
    append("SIGTERM drain: images kept against images written before the signal", lines)


if __name__ == "__main__":
    main()
