"""``embed-images duplicates``: groups of current images with the same bytes, and with
``--near`` groups whose vectors' cosine similarity passes a threshold."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from ray import cloudpickle

from bench.overhead import Identity
from pipeline.cli import main
from pipeline.config import EmbedConfig
from pipeline.duplicates import exact_groups, near_groups
from pipeline.embed import EMBEDDING_DIM
from pipeline.run import execute_run, prepare_run

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _seeded(text: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(text.encode())).standard_normal(EMBEDDING_DIM)


class Families(Identity):
    """``FAMILY-N.png`` embeds near its family's vector (cosine about 0.99 to it); images
    of different families are about orthogonal."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        for i, uri in enumerate(batch["uri"]):
            name = str(uri).rsplit("/", 1)[1]
            out["embedding"][i] = _seeded(name.split("-")[0]) + 0.1 * _seeded(name)
        return out


def test_exact_and_near_duplicate_groups(ray_session, tmp_path: Path, make_image: Any) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    photos.mkdir()
    same = make_image((30, 20), seed=1)
    files = {
        "cat-1.png": same,
        "cat-2.png": make_image((30, 21), seed=2),
        "dog-1.png": make_image((30, 22), seed=3),
        "dog-2.png": make_image((30, 23), seed=4),
        "dog-3.png": make_image((30, 24), seed=5),
        "owl-1.png": make_image((30, 25), seed=6),
        "cat-1-copy.png": same,  # the same bytes as cat-1.png
    }
    for name, data in files.items():
        (photos / name).write_bytes(data)
    output = str(tmp_path / "out")
    config = EmbedConfig(input=str(photos), output=output, weights="random", batch_size=4)
    execute_run(prepare_run(config), embedder=Families)

    (group,) = exact_groups(output)
    assert group["uris"] == [str(photos / "cat-1-copy.png"), str(photos / "cat-1.png")]
    near = [g["uris"] for g in near_groups(output, 0.95)]
    names = [[Path(u).name for u in g] for g in near]
    assert names == [
        ["cat-1-copy.png", "cat-1.png", "cat-2.png"],
        ["dog-1.png", "dog-2.png", "dog-3.png"],
    ]
    assert not list(near_groups(output, 0.9999))  # the families' members differ a little

    lines = tmp_path / "groups.jsonl"
    assert main(["duplicates", output, "--near", "0.95", "--to", str(lines)]) == 0
    kinds = [json.loads(line)["kind"] for line in lines.read_text().splitlines()]
    assert kinds == ["exact", "near", "near"]
    assert main(["duplicates", output, "--near", "1.5"]) == 2
