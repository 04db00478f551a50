"""The least time any `embed-images run` of N images can take on this machine: a bare Python
process that imports torch and torchvision, gets the same seeded random weights as the timed runs,
builds the model, runs the forward on N pre-made inputs at the ceiling's batch and threads, and
exits. No listing, decoding, Ray or writing: what it costs is cost no pipeline can avoid.

    python -m bench.floor --images 256 --batch-size 64 --threads 2

`bench.efficiency` times it as a whole process, side by side with the pipeline's runs.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.embed import ResNet50Embedder


def model_and_inputs(
    batch_size: int, threads: int | None = None
) -> tuple[ResNet50Embedder, np.ndarray]:
    """The model stage (same seeded random weights as the timed runs) and a batch of inputs.

    The floor and the ceiling (``bench.efficiency.model_ceiling``) time this same forward.
    """
    from pipeline.embed import ResNet50Embedder
    from pipeline.preprocessing import preprocess_spec
    from pipeline.weights import load_weights

    spec = preprocess_spec("center-crop")
    weights = load_weights("random", seed=0)
    embedder = ResNet50Embedder(
        state_dict=weights.state_dict, mean=spec.mean, std=spec.std, num_threads=threads
    )
    pixels = np.random.default_rng(0).integers(0, 255, (batch_size, 224, 224, 3), dtype=np.uint8)
    return embedder, pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rate-at",
        type=float,
        metavar="EPOCH",
        help="instead: warm up, wait for this time.time(), forward for --seconds, print the rate "
        "(several such processes at once give the ceiling of a layout, bench.efficiency)",
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    embedder, pixels = model_and_inputs(args.batch_size, args.threads)
    if args.rate_at is not None:
        embedder.embed(pixels)  # warm-up
        time.sleep(max(0.0, args.rate_at - time.time()))
        late = time.time() - args.rate_at  # > 0: this process started the clock late
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            embedder.embed(pixels)
            done += args.batch_size
        print(f"rate {done / (time.perf_counter() - start):.4f} late {late:.3f}")
        return
    done = 0
    while done < args.images:
        n = min(args.batch_size, args.images - done)
        embedder.embed(pixels[:n])
        done += n
    print(f"forward passes on {done} pre-made images done")


if __name__ == "__main__":
    main()
