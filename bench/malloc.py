"""What the CPU model actor's malloc settings are worth: page faults and time per forward pass.

    python -m bench.malloc [--images 32] [--passes 4]

Each variant runs in a fresh process (glibc reads MALLOC_ARENA_MAX at start) and calls the
model from a worker thread, as Ray Data does: glibc's defaults; ``keep_freed_memory`` alone
(what the main thread needs); and ``keep_freed_memory`` with ``CPU_ACTOR_ENV`` (what the
pipeline's CPU actors run with). ``tests/test_embed.py`` checks that the pipeline applies both;
this script measures what they change on the machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import concurrent.futures, json, resource, statistics, sys, time
import numpy as np
from pipeline import embed
from pipeline.preprocessing import preprocess_spec
from pipeline.weights import load_weights

images, passes, keep = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if not keep:
    embed.keep_freed_memory = lambda: None
spec = preprocess_spec("center-crop")
model = embed.ResNet50Embedder(
    state_dict=load_weights("random").state_dict, mean=spec.mean, std=spec.std, device="cpu"
)
batch = np.random.default_rng(0).integers(0, 255, (images, 224, 224, 3), dtype=np.uint8)

def forward_passes():
    faults, seconds = [], []
    for _ in range(passes):
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        model.embed(batch)
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults, seconds

# A worker thread, as Ray Data calls the model stage.
with concurrent.futures.ThreadPoolExecutor(1) as pool:
    faults, seconds = pool.submit(forward_passes).result()
later = slice(1, None)  # the first pass maps the buffers in any variant
print(json.dumps({
    "faults": int(statistics.median(faults[later])),
    "seconds": statistics.median(seconds[later]),
}))
"""

VARIANTS: tuple[tuple[str, bool, dict[str, str]], ...] = (
    ("glibc defaults", False, {}),
    ("keep_freed_memory (mallopt) alone", True, {}),
    ("mallopt + CPU_ACTOR_ENV (the pipeline's CPU actors)", True, {"MALLOC_ARENA_MAX": "1"}),
)


def measure(images: int, passes: int, keep: bool, env_vars: dict[str, str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env_vars
    env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(images), str(passes), "1" if keep else "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    from bench.results import append

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images per forward pass")
    parser.add_argument("--passes", type=int, default=4, help="forward passes per variant")
    args = parser.parse_args()
    lines = [
        f"Median of passes 2..{args.passes}, {args.images} images a pass, the model called "
        "from a worker thread.",
        "",
        "| malloc settings | page faults per pass | seconds per pass | images/s |",
        "| --- | --- | --- | --- |",
    ]
    for name, keep, env_vars in VARIANTS:
        figures = measure(args.images, args.passes, keep, env_vars)
        lines.append(
            f"| {name} | {figures['faults']:,} | {figures['seconds']:.2f} | "
            f"{args.images / figures['seconds']:.1f} |"
        )
    append("CPU model actor: malloc settings (page faults per forward pass)", lines)


if __name__ == "__main__":
    main()
