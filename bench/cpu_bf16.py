"""CPU bf16 against fp32: the model alone, the pipeline's steady state, and the embeddings.

    python -m bench.cpu_bf16 --images 128 --scale 4

On a CPU with AVX512-BF16 or AMX, `--precision bf16` runs the CPU model under bf16 autocast.
For each precision this times `embed-images run` on N and SCALE x N small JPEGs (cold, each
starting its own Ray); the difference of the two walls gives the steady-state rate, free of
start-up. The model-only rate (the same forward on pre-made inputs, batch 32, every core) is
the ceiling each steady state is compared with. The embeddings of the two larger runs are
compared image by image (relative L2) and by their nearest neighbours.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.corpus import make_corpus
from bench.results import append, embed_command, run_measured


def model_rate(precision: str, batch: int, seconds: float = 8.0) -> float:
    from pipeline.embed import ResNet50Embedder
    from pipeline.preprocessing import preprocess_spec
    from pipeline.weights import load_weights

    spec = preprocess_spec("center-crop")
    embedder = ResNet50Embedder(
        state_dict=load_weights("random", seed=0).state_dict,
        mean=spec.mean,
        std=spec.std,
        precision=precision,  # type: ignore[arg-type]
        device="cpu",
    )
    pixels = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
    embedder.embed(pixels)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        embedder.embed(pixels)
        done += batch
    return done / (time.perf_counter() - start)


def vectors(output: Path) -> tuple[list[str], np.ndarray]:
    from pipeline.read import read_embeddings

    table = read_embeddings(str(output), columns=["uri", "embedding"]).sort_by("uri")
    return table["uri"].to_pylist(), np.array(table["embedding"].to_pylist(), dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-bf16-"))
    try:
        small = work / "small"
        make_corpus("small", small, count=args.images)
        more = work / "more"
        make_corpus("small", more, count=args.images * args.scale)
        rows, walls = [], {}
        ceilings = {p: model_rate(p, args.batch_size) for p in ("fp32", "bf16")}
        for precision in ("fp32", "bf16"):
            flags = f"--precision {precision} --batch-size {args.batch_size}"
            short, _, _ = run_measured(embed_command(small, work / f"{precision}-1", flags))
            long, _, _ = run_measured(embed_command(more, work / f"{precision}-2", flags))
            steady = args.images * (args.scale - 1) / (long - short)
            walls[precision] = steady
            rows.append(
                f"| {precision} | {ceilings[precision]:.1f} | {short:.1f} s / {long:.1f} s | "
                f"{steady:.1f} | {steady / ceilings[precision]:.2f} |"
            )
            print(rows[-1], flush=True)
        uris32, fp32 = vectors(work / "fp32-2")
        uris16, bf16 = vectors(work / "bf16-2")
        assert uris32 == uris16
        relative = np.linalg.norm(bf16 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)

        def neighbours(x: np.ndarray) -> np.ndarray:
            unit = x / np.linalg.norm(x, axis=1, keepdims=True)
            similarity = unit @ unit.T
            np.fill_diagonal(similarity, -np.inf)
            return np.argsort(-similarity, axis=1)[:, :5]

        same_first = float(np.mean(neighbours(fp32)[:, 0] == neighbours(bf16)[:, 0]))
        overlap = float(
            np.mean(
                [
                    len(set(a) & set(b)) / 5
                    for a, b in zip(neighbours(fp32), neighbours(bf16), strict=True)
                ]
            )
        )
        lines = [
            f"Small JPEGs (500x375), {args.images} and {args.images * args.scale} images a run, "
            f"batch {args.batch_size}, seeded random weights; each run cold (its own Ray).",
            "",
            "| precision | model only (images/s) | walls, small / large run | steady state "
            "(images/s) | of its model-only rate |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"- bf16 / fp32: model only {ceilings['bf16'] / ceilings['fp32']:.2f}x, pipeline "
            f"steady state {walls['bf16'] / walls['fp32']:.2f}x.",
            f"- Embeddings, bf16 vs fp32, {len(relative)} images: relative L2 max "
            f"{relative.max():.4f}, mean {relative.mean():.4f}; the nearest neighbour is the same "
            f"for {same_first:.0%} of images, the 5 nearest overlap {overlap:.0%}.",
        ]
        if args.no_append:
            print("\n".join(lines))
        else:
            append("CPU bf16 against fp32", lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
