"""Make image corpora for the demo and the benchmarks: photo-like content, seeded.

python -m bench.corpus --kind small --count 256 --out /tmp/corpus-small
python -m bench.corpus --kind phone --count 16 --out /tmp/corpus-phone
python -m bench.corpus --kind mixed --count 64 --out /tmp/corpus-mixed
python -m bench.corpus --kind demo --out demo/images
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = {
    # name: (sizes, formats)
    "small": ([(500, 375), (375, 500)], ["JPEG"]),
    "phone": ([(4032, 3024), (3024, 4032)], ["JPEG"]),
    "mixed": ([(500, 375), (1024, 768), (640, 640), (4032, 3024)], ["JPEG", "PNG", "WEBP"]),
    "demo": ([(640, 480), (480, 640), (320, 320), (800, 450)], ["JPEG", "PNG", "WEBP"]),
}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth gradients, a few soft shapes and sensor-like noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    width, height = size
    # Build at low resolution and upscale: cheap for 12-megapixel images.
    small = (max(8, width // 8), max(8, height // 8))
    yy, xx = np.mgrid[0 : small[1], 0 : small[0]].astype(np.float32)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        channels.append(128 + 90 * np.sin(a * xx / small[0] * 6 + b * yy / small[1] * 6 + c * 3))
    base = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(base)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, small[0])), int(rng.integers(0, small[1]))
        r = int(rng.integers(2, max(3, min(small) // 3)))
        draw.ellipse(
            (x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
    image = base.filter(ImageFilter.GaussianBlur(1)).resize(size, Image.Resampling.BILINEAR)
    noise = rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def make_corpus(kind: str, out: Path, *, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` images of ``kind`` under ``out``; returns their paths."""
    sizes, formats = KINDS[kind]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        fmt = formats[i % len(formats)]
        buffer = io.BytesIO()
        options = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
        photo_like(size, seed + i).save(buffer, format=fmt, **options)
        path = out / f"{kind}-{i:05d}.{EXTENSIONS[fmt]}"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def listing_batch(paths: list[str]) -> dict[str, np.ndarray]:
    """The listing columns a decode or fetch task takes, for local files (as ``list_images``
    gives them: the path is the URI, the size is the file's)."""
    return {
        "uri": np.asarray(paths, dtype=object),
        "path": np.asarray(paths, dtype=object),
        "file_size": np.asarray([Path(p).stat().st_size for p in paths], dtype=np.int64),
        "source_version": np.asarray([""] * len(paths), dtype=object),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=sorted(KINDS), default="demo")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    paths = make_corpus(args.kind, args.out, count=args.count, seed=args.seed)
    print(f"wrote {len(paths)} {args.kind} images under {args.out}")


if __name__ == "__main__":
    main()
