"""Target 1: end-to-end `embed-images run` throughput (start-up included) against the model-only
ceiling (the same ResNet50 forward on pre-made tensors, best batch and thread settings), measured
side by side in one run.

    python -m bench.efficiency --images 256
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.corpus import make_corpus
from bench.results import append, embed_command, run_measured


def model_ceiling(
    images: int, batch_sizes: list[int], threads: list[int]
) -> tuple[float, int, int]:
    """Best images/s of the model stage alone on pre-decoded uint8 tensors."""
    import torch

    from pipeline.embed import ResNet50Embedder
    from pipeline.preprocessing import preprocess_spec
    from pipeline.weights import load_weights

    spec = preprocess_spec("center-crop")
    weights = load_weights("random", seed=0)
    embedder = ResNet50Embedder(state_dict=weights.state_dict, mean=spec.mean, std=spec.std)
    pixels = np.random.default_rng(0).integers(
        0, 255, (max(batch_sizes), 224, 224, 3), dtype=np.uint8
    )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--ceiling-images", type=int, default=96, help="images per ceiling setting")
    parser.add_argument("--batch-sizes", default="16,32,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--run-args", default="", help="extra flags for embed-images run")
    parser.add_argument("--no-append", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-eff-"))
    try:
        make_corpus("small", work / "images", count=args.images)
        command = embed_command(work / "images", work / "out", args.run_args)
        wall, peak, output = run_measured(command)
        pipeline_rate = args.images / wall
        print(output[-1200:])
        ceiling, batch, threads = model_ceiling(
            args.ceiling_images,
            [int(b) for b in args.batch_sizes.split(",")],
            [int(t) for t in args.threads.split(",")],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = pipeline_rate / ceiling
    lines = [
        "| measure | figure |",
        "| --- | --- |",
        f"| `embed-images run` on {args.images} small JPEGs (500x375), wall incl. start-up | {wall:.1f} s = {pipeline_rate:.2f} images/s |",
        f"| model-only ceiling (best of batch {args.batch_sizes}, threads {args.threads}) | {ceiling:.2f} images/s (batch {batch}, {threads} threads) |",
        f"| ratio (target >= 0.9) | **{ratio:.2f}** |",
        f"| peak RSS, driver + Ray workers | {peak / 2**20:.0f} MiB |",
        f"| run flags | `{args.run_args or '(defaults)'}` |",
    ]
    if args.no_append:
        print("\n".join(lines))
    else:
        append("Target 1: pipeline efficiency (end to end vs model-only ceiling)", lines)


if __name__ == "__main__":
    main()
