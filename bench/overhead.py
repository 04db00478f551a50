"""Per-image overhead of the plan: the real plan, with the model stage replaced by an identity.

    python -m bench.overhead --empty 4000 --small 1000 --decode-batch-sizes 16,64,256

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

from bench.corpus import make_corpus
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


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its live descendants (Ray's workers included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += times.get(current, 0.0)
        stack.extend(children.get(current, []))
    return total


def decode_cpu_ms(folder: Path) -> float:
    """CPU-ms per image of ``decode_batch`` alone, in this process, on the same files."""
    from pipeline.decode import decode_batch
    from pipeline.preprocessing import preprocess_spec

    paths = sorted(str(p) for p in folder.iterdir())
    batch = {
        "uri": np.asarray(paths, dtype=object),
        "path": np.asarray(paths, dtype=object),
        "file_size": np.zeros(len(paths), dtype=np.int64),
        "source_version": np.asarray([""] * len(paths), dtype=object),
    }
    spec = preprocess_spec("center-crop")
    start = time.process_time()
    for i in range(0, len(paths), 64):
        part = {k: v[i : i + 64] for k, v in batch.items()}
        decode_batch(part, spec=spec, storage_options={}, max_image_pixels=10**8)
    return 1000 * (time.process_time() - start) / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--empty", type=int, default=4000, help="zero-byte files")
    parser.add_argument("--small", type=int, default=1000, help="small JPEGs")
    parser.add_argument("--decode-batch-sizes", default="16,64,256")
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
        empty = work / "empty"
        empty.mkdir()
        for i in range(args.empty):
            (empty / f"{i:06d}.jpg").write_bytes(b"")
        small = work / "small"
        make_corpus("small", small, count=args.small)
        rows = []
        for name, folder, count in (
            ("zero-byte", empty, args.empty),
            ("small JPEG", small, args.small),
        ):
            decode_ms = decode_cpu_ms(folder)
            for size in [int(s) for s in args.decode_batch_sizes.split(",")]:
                output = work / f"out-{name}-{size}".replace(" ", "-")
                config = EmbedConfig(
                    input=str(folder),
                    output=str(output),
                    weights="random",
                    decode_batch_size=size,
                    max_error_rate=1.0,
                    **extra,
                )
                cpu0 = tree_cpu_seconds(os.getpid())
                record = execute_run(prepare_run(config), embedder=Identity)
                cpu = tree_cpu_seconds(os.getpid()) - cpu0
                report = json.loads((output / "_reports" / f"{record.run_id}.json").read_text())
                execution = report["stage_seconds"]["execution"]
                per_image = 1000 * cpu / count
                rows.append(
                    f"| {name} | {count} | {size} | {execution:.1f} s | {count / execution:,.0f} | "
                    f"{per_image:.2f} | {decode_ms:.2f} | {per_image - decode_ms:.2f} |"
                )
                print(rows[-1], flush=True)
        lines = [
            "One local Ray, 2 CPUs; the model stage is an identity (no forward pass). CPU ms: "
            "every process of the run (driver and Ray's workers), whole run (listing, start of "
            "the actors, execution, commit), per image.",
            "",
            "| files | images | --decode-batch-size | execution | rows/s | CPU ms / image | "
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
