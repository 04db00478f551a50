"""Per-image overhead of the plan: the real plan, with the model stage replaced by an identity.

    python -m bench.overhead --empty 2000 --small 500 --decode-batch-sizes 16,128,256

It runs `execute_run` (listing, decode tasks, the model stage's actor, the writer tasks, the
commit) in one local Ray with 2 CPUs, on zero-byte `.jpg` files (each an `empty` error row: no
decode, no forward pass) and on small JPEGs. The model stage is a bench-only subclass that
returns zero vectors without a forward pass, so what is left is what the plan costs per image:
rows/s of the execution stage, and CPU-milliseconds per image of every process of the run
(driver and Ray's workers), less what `decode_batch` alone takes on the same files in-process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.corpus import listing_batch, make_corpus
from bench.results import append
from pipeline.embed import EMBEDDING_DIM, ResNet50Embedder


class Identity(ResNet50Embedder):
    """The model stage without a model: zero vectors, the columns the real one returns."""

    def __init__(self, **kwargs: Any) -> None:  # no weights, no torch
        self.decode_spec = kwargs.get("decode_spec")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {key: value for key, value in batch.items() if key not in ("image", "data")}
        out["embedding"] = np.zeros((len(batch["uri"]), EMBEDDING_DIM), dtype=np.float32)
        return out


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (``/proc/stat``: all but idle and iowait).

    The bench runs on an otherwise idle machine, so the difference around a run is the run's
    CPU: the driver, Ray's own processes and its workers, those that exit included.
    """
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def decode_cpu_ms(folder: Path) -> float:
    """CPU-ms per image of ``decode_batch`` alone, in this process, on the same files."""
    from pipeline.decode import decode_batch
    from pipeline.preprocessing import preprocess_spec

    paths = sorted(str(p) for p in folder.iterdir())
    batch = listing_batch(paths)
    spec = preprocess_spec("center-crop")
    start = time.process_time()
    for i in range(0, len(paths), 64):
        part = {k: v[i : i + 64] for k, v in batch.items()}
        decode_batch(part, spec=spec, storage_options={}, max_image_pixels=10**8)
    return 1000 * (time.process_time() - start) / len(paths)


def make_corpora(
    work: Path, empty: int, small: int, scale: int
) -> list[tuple[str, list[tuple[Path, int]]]]:
    """Each kind of file, in two folders: N files and SCALE x N."""
    corpora = []
    for name, count in (("zero-byte", empty), ("small JPEG", small)):
        pair = []
        for n in (count, scale * count):  # a run and a run SCALE x as long
            folder = work / f"{name.replace(' ', '-')}-{n}"
            if name == "zero-byte":
                folder.mkdir()
                for i in range(n):
                    (folder / f"{i:06d}.jpg").write_bytes(b"")
            else:
                make_corpus("small", folder, count=n)
            pair.append((folder, n))
        corpora.append((name, pair))
    return corpora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--empty", type=int, default=2000, help="zero-byte files")
    parser.add_argument("--small", type=int, default=500, help="small JPEGs")
    parser.add_argument("--decode-batch-sizes", default="16,128,256")
    parser.add_argument("--scale", type=int, default=4, help="the second run: SCALE x the files")
    parser.add_argument("--run-args", default="", help="EmbedConfig fields, e.g. batch_size=64")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    import json

    import ray

    from pipeline.config import EmbedConfig
    from pipeline.run import execute_run, prepare_run

    extra: dict[str, Any] = {}
    for item in args.run_args.split():
        key, value = item.split("=", 1)
        extra[key] = int(value)
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        corpora = make_corpora(work, args.empty, args.small, args.scale)
        rows = []
        for name, pair in corpora:
            decode_ms = decode_cpu_ms(pair[0][0])
            for size in [int(s) for s in args.decode_batch_sizes.split(",")]:
                measured = []
                for folder, n in pair:
                    output = work / f"out-{folder.name}-{size}"
                    config = EmbedConfig(
                        input=str(folder),
                        output=str(output),
                        weights="random",
                        decode_batch_size=size,
                        max_error_rate=1.0,
                        **extra,
                    )
                    cpu0 = machine_cpu_seconds()
                    record = execute_run(prepare_run(config), embedder=Identity)
                    cpu = machine_cpu_seconds() - cpu0
                    report = json.loads((output / "_reports" / f"{record.run_id}.json").read_text())
                    measured.append((n, report["stage_seconds"]["execution"], cpu))
                (n1, exec1, cpu1), (n2, exec2, cpu2) = measured
                # The difference of the two runs: per-image cost, free of each run's fixed cost.
                rate = (n2 - n1) / (exec2 - exec1)
                per_image = 1000 * (cpu2 - cpu1) / (n2 - n1)
                rows.append(
                    f"| {name} | {n1} / {n2} | {size} | {exec1:.1f} s / {exec2:.1f} s | "
                    f"{rate:,.0f} | {per_image:.2f} | {decode_ms:.2f} | "
                    f"{per_image - decode_ms:.2f} |"
                )
                print(rows[-1], flush=True)
        lines = [
            "One local Ray, 2 CPUs; the model stage is an identity (no forward pass). Each "
            f"setting runs on N and {args.scale} x N files; the difference of the two runs gives "
            "the steady rate (rows/s of the execution stage) and the CPU per image, free of a "
            "run's fixed cost. CPU: the machine's busy time (/proc/stat, all processes: driver, "
            "Ray and its workers); the machine runs nothing else.",
            "",
            "| files | images | --decode-batch-size | execution | steady rows/s | CPU ms / image | "
            "of which decode_batch alone | overhead ms / image |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Run flags besides: `{args.run_args or '(defaults)'}`.",
        ]
        if args.no_append:
            print("\n".join(lines))
        else:
            append("Per-image overhead of the plan (identity model)", lines)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
