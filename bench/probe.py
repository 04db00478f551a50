"""The probe's tolerance: how far re-embedded vectors move from stored ones, by cause.

python -m bench.probe --images 64
python -m bench.probe --images 64 --device cuda --precisions fp32,fp16,bf16   # a GPU machine

Decodes ``--images`` photo-like JPEGs with the default preprocessing and embeds them with the
real ResNet50 (seeded random weights, and the ImageNet weights where they are cached), as
stored vectors; then again under each change below, reporting the relative L2 error
``|new - stored| / |stored|`` (the probe's measure): median and max over the images.

- the same configuration, other batch sizes and thread counts (what a probe of an unchanged
  run sees on the same kind of device);
- each of ``--precisions`` against itself at another batch size, and against fp32 stored
  vectors;
- a resize a fraction of a pixel off (224 -> 220 -> 224, bilinear), and bicubic instead of
  bilinear interpolation (what a library upgrade might do);
- one weight of 25 million changed by 1 % (a corrupted model).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.corpus import listing_batch, make_corpus
from bench.results import append, machine
from pipeline.decode import decode_batch
from pipeline.embed import ResNet50Embedder
from pipeline.preprocessing import preprocess_spec
from pipeline.weights import load_weights


def relative_errors(new: np.ndarray, stored: np.ndarray) -> np.ndarray:
    return np.linalg.norm(new - stored, axis=1) / np.linalg.norm(stored, axis=1)


def resized(images: np.ndarray, size: int, method: Image.Resampling) -> np.ndarray:
    """Each image through ``size`` x ``size`` and back."""
    return np.stack(
        [
            np.asarray(
                Image.fromarray(image)
                .resize((size, size), method)
                .resize(image.shape[:2][::-1], method)
            )
            for image in images
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated")
    parser.add_argument("--results", help="append to this file instead of bench/RESULTS.md")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    spec = preprocess_spec("center-crop")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(p) for p in make_corpus("small", Path(tmp), count=args.images)]
        decoded = decode_batch(
            listing_batch(paths), spec=spec, storage_options={}, max_image_pixels=10**8
        )
    images = decoded["image"]
    weights = load_weights("random", seed=0)

    def model(
        precision: str = "fp32", threads: int | None = None, state: dict | None = None
    ) -> ResNet50Embedder:
        return ResNet50Embedder(
            state_dict=state or weights.as_numpy(),
            mean=spec.mean,
            std=spec.std,
            precision=precision,  # type: ignore[arg-type]
            num_threads=threads,
            device=args.device,
        )

    def embed(embedder: ResNet50Embedder, pixels: np.ndarray, batch: int) -> np.ndarray:
        return np.concatenate(
            [embedder.embed(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
        )

    started = time.perf_counter()
    fp32 = model()
    stored = embed(fp32, images, 32)
    rows: list[tuple[str, np.ndarray]] = []
    rows.append(("fp32, batch 7 instead of 32", relative_errors(embed(fp32, images, 7), stored)))
    rows.append(
        ("fp32, 1 thread, batch 1", relative_errors(embed(model(threads=1), images, 1), stored))
    )
    for precision in args.precisions.split(","):
        if precision == "fp32":
            continue
        low = model(precision)
        stored_low = embed(low, images, 32)
        rows.append(
            (
                f"{precision}, batch 7 against {precision}",
                relative_errors(embed(low, images, 7), stored_low),
            )
        )
        rows.append((f"{precision} against fp32 stored", relative_errors(stored_low, stored)))
    rows.append(
        (
            "fp32, resized 224 -> 220 -> 224 bilinear",
            relative_errors(
                embed(fp32, resized(images, 220, Image.Resampling.BILINEAR), 32), stored
            ),
        )
    )
    rows.append(
        (
            "fp32, resized 224 -> 223 -> 224 bicubic",
            relative_errors(
                embed(fp32, resized(images, 223, Image.Resampling.BICUBIC), 32), stored
            ),
        )
    )
    corrupted = dict(weights.as_numpy())
    name = "layer4.2.conv3.weight"
    corrupted[name] = corrupted[name].copy()
    corrupted[name].reshape(-1)[0] *= 1.01
    rows.append(
        (
            "fp32, one weight 1 % off",
            relative_errors(embed(model(state=corrupted), images, 32), stored),
        )
    )
    lines = [
        f"`python -m bench.probe --images {args.images} --device {args.device} --precisions "
        f"{args.precisions}` ({machine()}; ResNet50, seeded random weights; "
        f"{time.perf_counter() - started:.0f} s)",
        "",
        "| change | median relative L2 error | max |",
        "| --- | --- | --- |",
        *(f"| {what} | {np.median(e):.2e} | {np.max(e):.2e} |" for what, e in rows),
    ]
    print("\n".join(lines))
    if args.results:
        with open(args.results, "a", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
    elif not args.no_record:
        append("The probe's tolerance: relative error of re-embedded vectors", lines)


if __name__ == "__main__":
    main()
