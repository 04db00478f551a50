"""Target 2: per-core decode + resize throughput, the naive way against ours (exact, and with
libjpeg's DCT-domain downscale, ``Image.draft``), and how far draft moves the embeddings; and
what hashing each file's bytes (``content_sha256``, reuse by content) costs beside a decode,
against the other cryptographic hashes hashlib offers.

    python -m bench.decode --phone 12 --small 96 --mixed 48
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.corpus import make_corpus
from bench.results import append


def naive(data: bytes) -> object:
    """What a first script does: full decode, RGB, squash to 224, to tensor, normalize."""
    from PIL import Image
    from torchvision import transforms as T  # noqa: N812

    transform = T.Compose(
        [
            T.Resize((224, 224)),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    return transform(Image.open(io.BytesIO(data)).convert("RGB"))


def rate(fn: Callable[[bytes], object], files: list[bytes], repeat: int = 1) -> float:
    fn(files[0])  # warm-up (imports, plugin registration)
    start = time.perf_counter()
    for _ in range(repeat):
        for data in files:
            fn(data)
    return repeat * len(files) / (time.perf_counter() - start)


# The hashes a content digest could use: sha256 is the one the rows record.
HASHES = ("sha256", "blake2b", "sha1", "md5")


def hash_lines(
    corpora: dict[str, list[bytes]], decode_rates: dict[str, tuple[float, float]]
) -> list[str]:
    """Per corpus: each hash's throughput, and sha256's time against one decode (exact and
    draft, ``decode_rates`` in images/s)."""
    lines = [
        "",
        "Hashing a file's bytes (one core), against our decode of the same files:",
        "",
        "| corpus | mean file | "
        + " | ".join(f"{h} MB/s" for h in HASHES)
        + " | sha256 µs per file | share of an exact decode | of a draft decode |",
        "| --- | --- | " + " | ".join("---" for _ in HASHES) + " | --- | --- | --- |",
    ]
    for kind, files in corpora.items():
        size = sum(map(len, files))
        speeds = {}
        for name in HASHES:
            repeat = max(1, int(200e6 // size))
            start = time.perf_counter()
            for _ in range(repeat):
                for data in files:
                    hashlib.new(name, data).digest()
            speeds[name] = repeat * size / (time.perf_counter() - start) / 1e6
        per_file = size / len(files) / (speeds["sha256"] * 1e6)
        exact_s, draft_s = (1 / r for r in decode_rates[kind])
        lines.append(
            f"| {kind} | {size / len(files) / 1e3:.0f} kB | "
            + " | ".join(f"{speeds[h]:,.0f}" for h in HASHES)
            + f" | {per_file * 1e6:,.0f} | {per_file / exact_s:.1%} | {per_file / draft_s:.1%} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phone", type=int, default=12)
    parser.add_argument("--small", type=int, default=96)
    parser.add_argument("--mixed", type=int, default=48)
    parser.add_argument(
        "--embed-check", type=int, default=8, help="phone images compared through the model"
    )
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    import torch

    from pipeline.decode import decode_image
    from pipeline.embed import ResNet50Embedder
    from pipeline.preprocessing import preprocess_spec
    from pipeline.weights import load_weights

    torch.set_num_threads(1)  # per core
    exact, draft = preprocess_spec("center-crop"), preprocess_spec("center-crop", jpeg_draft=True)
    limit = 89_478_485
    work = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    lines = [
        "| corpus | naive (open, RGB, Resize, ToTensor, Normalize) | ours, exact | ours, draft | draft / naive |",
        "| --- | --- | --- | --- | --- |",
    ]
    try:
        corpora = {}
        for kind, count in (("small", args.small), ("phone", args.phone), ("mixed", args.mixed)):
            paths = make_corpus(kind, work / kind, count=count)
            corpora[kind] = [p.read_bytes() for p in paths]
        decode_rates = {}
        for kind, files in corpora.items():
            naive_rate = rate(naive, files)
            exact_rate = rate(lambda d: decode_image(d, exact, max_image_pixels=limit), files)
            draft_rate = rate(lambda d: decode_image(d, draft, max_image_pixels=limit), files)
            decode_rates[kind] = (exact_rate, draft_rate)
            lines.append(
                f"| {kind} ({len(files)} files) | {naive_rate:.1f} images/s | {exact_rate:.1f} images/s "
                f"| {draft_rate:.1f} images/s | **{draft_rate / naive_rate:.1f}x** |"
            )
            print(lines[-1], flush=True)
        lines += hash_lines(corpora, decode_rates)
        # How far does draft move the embeddings? Same random weights, phone JPEGs.
        weights = load_weights("random", seed=0)
        embedder = ResNet50Embedder(state_dict=weights.state_dict, mean=exact.mean, std=exact.std)
        phone = corpora["phone"][: args.embed_check]
        full = embedder.embed(
            np.stack([decode_image(d, exact, max_image_pixels=limit).pixels for d in phone])
        )
        fast = embedder.embed(
            np.stack([decode_image(d, draft, max_image_pixels=limit).pixels for d in phone])
        )
        relative = np.linalg.norm(fast - full, axis=1) / np.linalg.norm(full, axis=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines += [
        "",
        f"Embedding change from draft on {len(phone)} phone JPEGs (seeded random ResNet50 weights): "
        f"relative L2 max **{relative.max():.4f}**, mean {relative.mean():.4f} (target <= 0.01).",
        "Rates are one process, one thread (`torch.set_num_threads(1)`), so per core.",
    ]
    if args.no_append:
        print("\n".join(lines))
    else:
        append("Target 2: decode + resize per core", lines)


if __name__ == "__main__":
    main()
