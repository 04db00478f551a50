"""After the tables: embed one image the way a table was made, and find its nearest rows.

The model and preprocessing come from the output's manifest; weights that differ from the
recorded ones (by sha256) are refused, since their vectors would not be comparable.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS, PipelineError
from pipeline.decode import ImageRejectedError, decode_image
from pipeline.embed import ResNet50Embedder
from pipeline.manifest import Manifest
from pipeline.output import Output
from pipeline.preprocessing import PreprocessSpec
from pipeline.read import iter_current
from pipeline.storage import open_fs
from pipeline.weights import load_weights


def recorded_weights_source(name: str) -> tuple[str, int]:
    """``--weights`` and ``--seed`` that reproduce a recorded weights name.

    Example:
        >>> recorded_weights_source("random:seed=3")
        ('random', 3)
    """
    if name.startswith("imagenet:"):
        return "imagenet", 0
    if name.startswith("random:seed="):
        return "random", int(name.split("=", 1)[1])
    return name, 0


def spec_from_metadata(block: Mapping[str, Any]) -> PreprocessSpec:
    fields = {f.name for f in dataclasses.fields(PreprocessSpec)}
    values: dict[str, Any] = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in block.items() if k in fields
    }
    return PreprocessSpec(**values)


def table_embedder(
    output: str,
    *,
    manifest: Manifest | None,
    weights: str | None = None,
    seed: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[ResNet50Embedder, PreprocessSpec]:
    """The model stage and preprocessing that made ``output``'s vectors, checked by sha256."""
    if manifest is None or manifest.model is None:
        raise PipelineError(f"no committed run under {output}")
    model = manifest.model
    recorded_source, recorded_seed = recorded_weights_source(model.weights)
    source = weights or recorded_source
    resolved = load_weights(
        source,
        seed=recorded_seed if seed is None else seed,
        storage_options=storage_options,
    )
    if resolved.sha256 != model.weights_sha256:
        raise PipelineError(
            f"weights {resolved.name} (sha256 {resolved.sha256[:12]}…) are not the ones that made "
            f"{output} ({model.weights}, sha256 {model.weights_sha256[:12]}…): "
            "pass those with --weights"
        )
    spec = spec_from_metadata(manifest.preprocessing or {})
    embedder = ResNet50Embedder(
        state_dict=resolved.state_dict,
        mean=spec.mean,
        std=spec.std,
        normalize=model.normalized,
    )
    return embedder, spec


def nearest(
    output: str,
    image: str,
    *,
    k: int = 10,
    weights: str | None = None,
    seed: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """The ``k`` rows of ``output`` nearest (L2) to ``image``, embedded as the table was.

    Args:
        output: An ``embed-images`` output.
        image: Path or URI of the query image.
        k: Neighbours to return.
        weights: Override the recorded weights source (must have the recorded sha256).
        seed: With ``weights="random"``, its seed.
        storage_options: fsspec options.

    Returns:
        ``rank``, ``distance``, ``uri``, ``original_width``, ``original_height``, nearest first.

    Example:
        >>> nearest("./out", "./photos/cat.jpg", k=5).to_pylist()[0]["uri"]  # doctest: +SKIP
        '/data/photos/cat.jpg'
    """
    if k < 1:
        raise PipelineError(f"--k {k}: must be >= 1")
    table_output = Output(output, storage_options)
    snapshot = table_output.snapshot()
    embedder, spec = table_embedder(
        output,
        manifest=snapshot.manifest,
        weights=weights,
        seed=seed,
        storage_options=storage_options,
    )
    fs, path = open_fs(image, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise PipelineError(f"query image not found: {image}") from None
    try:
        pixels = decode_image(data, spec, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS).pixels
    except ImageRejectedError as exc:
        raise PipelineError(f"cannot embed {image}: {exc.error_type}: {exc}") from None
    query = embedder.embed(pixels[None])[0]
    best: list[tuple[float, int, dict[str, Any]]] = []
    counter = 0
    for batch in iter_current(
        table_output,
        snapshot,
        columns=("uri", "original_width", "original_height", "embedding"),
        batch_size=4096,
    ):
        vectors = batch["embedding"].flatten().to_numpy().reshape(batch.num_rows, -1)
        distances = np.linalg.norm(vectors - query, axis=1)
        take = np.argsort(distances)[:k]
        rows = batch.take(pa.array(take)).select(["uri", "original_width", "original_height"])
        for distance, row in zip(distances[take], rows.to_pylist(), strict=True):
            counter += 1
            item = (-float(distance), counter, row)
            if len(best) < k:
                heapq.heappush(best, item)
            else:
                heapq.heappushpop(best, item)
    ordered = sorted(best, key=lambda t: (-t[0], t[1]))
    return pa.table(
        {
            "rank": pa.array(range(1, len(ordered) + 1), pa.int32()),
            "distance": pa.array([-d for d, _, _ in ordered], pa.float32()),
            "uri": [r["uri"] for _, _, r in ordered],
            "original_width": pa.array([r["original_width"] for _, _, r in ordered], pa.int32()),
            "original_height": pa.array([r["original_height"] for _, _, r in ordered], pa.int32()),
        }
    )
