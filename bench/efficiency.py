"""Target 1: end-to-end `embed-images run` throughput (start-up included) against the model-only
ceiling (the same ResNet50 forward on pre-made tensors, best batch and thread settings), measured
side by side in one run.

    python -m bench.efficiency --images 256

Besides the target's cold run (the command starts its own Ray), it times the same run into a Ray
that is already up (as a submitted job finds it) and a run on SCALE x the images, whose extra
wall time gives the steady-state rate and so the fixed start-up cost of a run. That longer run
also shows its progress bar into a pipe, and the counts it shows between 15% and 97% done give
the steady state within one run, free of the two runs' start-up noise. Besides the one-process
ceiling, one process per core with a thread each, forwarding at once, gives the ceiling of the
``--concurrency N --model-threads 1`` layout (no thread waits on another there). Two reference
processes run beside them on the same images: the floor (`bench.floor`: import torch and
torchvision, load the weights, forward pre-made inputs, exit: the least any run can take, so
its ratio is the most target 1 can reach here) and the plain pattern of Ray's batch-inference
tutorial (`bench.ray_tutorial`), the baseline the target's text starts from.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.corpus import make_corpus
from bench.floor import model_and_inputs
from bench.results import append, embed_command, run_measured


def model_ceiling(
    images: int, batch_sizes: list[int], threads: list[int]
) -> tuple[float, int, int]:
    """Best images/s of the model stage alone on pre-decoded uint8 tensors."""
    import torch

    embedder, pixels = model_and_inputs(max(batch_sizes))
    best = (0.0, 0, 0)
    for batch, n_threads in itertools.product(batch_sizes, threads):
        torch.set_num_threads(n_threads)
        embedder.embed(pixels[:batch])  # warm-up
        done, start = 0, time.perf_counter()
        while done < images:
            embedder.embed(pixels[:batch])
            done += batch
        rate = done / (time.perf_counter() - start)
        print(f"model only: batch {batch:3d}, {n_threads} threads: {rate:.2f} images/s", flush=True)
        best = max(best, (rate, batch, n_threads))
    return best


def layout_ceiling(processes: int, batch: int, seconds: float) -> float:
    """Images/s of ``processes`` model-only processes of one thread each, forwarding at once
    (as ``--concurrency N --model-threads 1`` actors would): no thread waits on another."""
    start_at = time.time() + 25.0  # every process imported torch and warmed up by then
    command = [sys.executable, "-m", "bench.floor", "--threads=1", f"--batch-size={batch}",
               f"--rate-at={start_at}", f"--seconds={seconds}"]  # fmt: skip
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(processes)
    ]
    reports = [p.communicate()[0].split() for p in procs]  # "rate R late L"
    if max(float(report[3]) for report in reports) > 1.0:
        raise RuntimeError("a layout process was not ready at the common start: raise the wait")
    total = sum(float(report[1]) for report in reports)
    print(f"model only: {processes} processes x 1 thread, batch {batch}: {total:.2f} images/s")
    return total


def run_counted(command: list[str]) -> tuple[float, list[tuple[float, int, int]]]:
    """Run ``embed-images run --progress bar`` into a pipe: (wall seconds, the time each new
    count of images done was first shown, with the count and the total)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--progress", "bar"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    points: list[tuple[float, int, int]] = []
    pending = b""
    while chunk := os.read(process.stderr.fileno(), 4096):
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        for line in lines:
            found = re.search(rb"([\d,]+)/([\d,]+) images", line)
            if found:
                done, total = (int(g.replace(b",", b"")) for g in found.groups())
                if not points or done != points[-1][1]:
                    points.append((time.perf_counter() - start, done, total))
    if process.wait() != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode})")
    return time.perf_counter() - start, points


def rate_between(points: list[tuple[float, int, int]], low: float, high: float) -> float:
    """Images/s between the first count past ``low`` of the total and the last below ``high``
    (the display reads the count once a second: each end is late by the same half second on
    average)."""
    inside = [(t, done) for t, done, total in points if low * total <= done <= high * total]
    (t0, d0), (t1, d1) = inside[0], inside[-1]
    return (d1 - d0) / (t1 - t0)


@contextlib.contextmanager
def running_ray(cpus: int) -> Iterator[dict[str, str]]:
    """A Ray head already up on 127.0.0.1, as on a cluster: yields the env that joins it."""
    port = _free_port()
    env = dict(os.environ) | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ADDRESS": f"127.0.0.1:{port}",
    }
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run(
        [ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--scale", type=int, default=4, help="a second run on SCALE x the images: steady state"
    )
    parser.add_argument("--ceiling-images", type=int, default=96, help="images per ceiling setting")
    parser.add_argument("--batch-sizes", default="16,32,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--layout-seconds", type=float, default=20.0)
    parser.add_argument("--run-args", default="", help="extra flags for embed-images run")
    parser.add_argument("--no-append", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()

    n, big = args.images, args.images * args.scale
    work = Path(tempfile.mkdtemp(prefix="bench-eff-"))
    try:
        make_corpus("small", work / "images", count=n)
        make_corpus("small", work / "more", count=big)
        # Cold: the command starts its own local Ray, as `embed-images run` on a laptop.
        cold, peak, output = run_measured(
            embed_command(work / "images", work / "o1", args.run_args)
        )
        print(output[-1200:])
        # Warm: a Ray already running, as on a cluster (`ray job submit`): no Ray start-up.
        with running_ray(os.cpu_count() or 1) as env:
            warm, _, _ = run_measured(
                embed_command(work / "images", work / "o2", args.run_args), env=env
            )
        # Steady state: the same start-up cost on SCALE x the images; the difference is work.
        longer, points = run_counted(embed_command(work / "more", work / "o3", args.run_args))
        tutorial, _, _ = run_measured(
            [sys.executable, "-m", "bench.ray_tutorial", str(work / "images"), str(work / "o4")]
        )
        ceiling, batch, threads = model_ceiling(
            args.ceiling_images,
            [int(b) for b in args.batch_sizes.split(",")],
            [int(t) for t in args.threads.split(",")],
        )
        cores = len(os.sched_getaffinity(0))
        layout = layout_ceiling(cores, batch, args.layout_seconds) if cores > 1 else 0.0
        floor, _, _ = run_measured(
            [sys.executable, "-m", "bench.floor", f"--images={n}", f"--batch-size={batch}",
             f"--threads={threads}"]
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steady = (big - n) / (longer - cold)
    overhead = cold - n / steady
    in_run = rate_between(points, 0.15, 0.97)
    best = max(ceiling, layout)
    lines = [
        "| measure | figure | / ceiling |",
        "| --- | --- | --- |",
        f"| model-only ceiling (best of batch {args.batch_sizes}, threads {args.threads}) | {ceiling:.2f} images/s (batch {batch}, {threads} threads) | 1 |",
        f"| `embed-images run`, {n} small JPEGs, cold (starts its own Ray), wall incl. start-up | {cold:.1f} s = {n / cold:.2f} images/s | **{n / cold / ceiling:.2f}** (target >= 0.9) |",
        f"| the same into a Ray already running (RAY_ADDRESS, as a submitted job) | {warm:.1f} s = {n / warm:.2f} images/s | {n / warm / ceiling:.2f} |",
        f"| the same, cold, on {big} images | {longer:.1f} s = {big / longer:.2f} images/s | {big / longer / ceiling:.2f} |",
        f"| steady state: ({big} - {n}) images / difference of the walls | {steady:.2f} images/s | {steady / ceiling:.2f} |",
        f"| steady state in the {big}-image run: its progress counts from 15% to 97% done | {in_run:.2f} images/s | **{in_run / ceiling:.2f}** (target >= 0.95) |",
        f"| model-only ceiling of {cores} one-thread processes at once (batch {batch}), the layout of `--concurrency {cores} --model-threads 1` | {layout:.2f} images/s | {layout / ceiling:.2f}; the run's steady state against the better of the two: {in_run / best:.2f} |",
        f"| fixed cost of a cold run (wall - {n} / steady rate) | {overhead:.1f} s | |",
        f"| floor: a bare process that imports torch + torchvision, loads the weights, forwards {n} pre-made inputs (batch {batch}, {threads} threads) and exits | {floor:.1f} s = {n / floor:.2f} images/s | {n / floor / ceiling:.2f} (the most target 1 can reach here) |",
        f"| plain pattern of Ray's batch-inference tutorial (`bench.ray_tutorial`), same {n} images, cold | {tutorial:.1f} s = {n / tutorial:.2f} images/s | {n / tutorial / ceiling:.2f} |",
        f"| `embed-images run` against those two | {tutorial / cold:.2f}x the tutorial's rate, {floor / cold:.2f} of the floor's | |",
        f"| peak RSS of the cold {n}-image run, driver + Ray workers | {peak / 2**20:.0f} MiB | |",
        f"| run flags | `{args.run_args or '(defaults)'}` | |",
    ]
    if args.no_append:
        print("\n".join(lines))
    else:
        append("Target 1: pipeline efficiency (end to end vs model-only ceiling)", lines)


if __name__ == "__main__":
    main()
