"""The vectors' statistics and the quality gate (pipeline.quality): counted in the writers,
added up in the driver, recorded per run; a NaN or an infinity is never committed unless
``--gate off``."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray import cloudpickle

from bench.overhead import Identity
from pipeline.config import EXIT_QUALITY_GATE, EmbedConfig
from pipeline.embed import EMBEDDING_DIM
from pipeline.quality import (
    batch_quality,
    describe,
    gate_refusal,
    merge_quality,
    norm_percentiles,
    summary,
)
from pipeline.read import read_embeddings, read_manifest
from pipeline.run import execute_run, prepare_run
from pipeline.runtime import report_failure
from pipeline.sink import QualityGateError

IMAGES = 12
# The model stage below runs in Ray's workers, which cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def vector(uri: str) -> np.ndarray:
    """A made-up embedding, the same for the same image (norm about 45)."""
    return np.random.default_rng(zlib.crc32(uri.encode())).standard_normal(EMBEDDING_DIM)


class Poisoned(Identity):
    """Seeded vectors; NaN for the images named ``bad…``, as a broken model would give."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        for i, uri in enumerate(batch["uri"]):
            out["embedding"][i] = np.nan if "/bad" in str(uri) else vector(str(uri))
        return out


def test_a_batchs_statistics_count_what_is_wrong_and_name_the_worst_row() -> None:
    rows = np.stack([vector(f"u{i}") for i in range(6)]).astype(np.float32)
    rows[1, :3] = np.nan
    rows[2, 0] = np.inf
    rows[2, 1] = -np.inf
    rows[2, 2:6] = np.nan  # six bad values: the worst row
    rows[4] = 0
    quality = batch_quality(rows, [f"u{i}" for i in range(6)])
    assert (quality["vectors"], quality["non_finite"], quality["zero"]) == (6, 2, 1)
    assert quality["worst"] == f"u2: 6 of {EMBEDDING_DIM} values NaN or infinite"
    refusal = gate_refusal(quality)
    assert refusal is not None and refusal.startswith("2 of 6 vectors hold NaN")
    assert gate_refusal(batch_quality(rows[[0, 3, 4, 5]], ["a", "b", "c", "d"])) is None


def test_norm_percentiles_added_up_from_parts_are_within_their_bins_resolution() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3000, 64)) * rng.uniform(0.1, 10, (3000, 1))
    parts = [batch_quality(rows[i : i + 500], list(range(500))) for i in range(0, 3000, 500)]
    total = merge_quality(parts)
    assert total["vectors"] == 3000 and total["non_finite"] == 0
    measured = norm_percentiles(total["norms"])
    exact = np.percentile(np.linalg.norm(rows, axis=1), [1, 50, 99])
    for (name, value), truth in zip(measured.items(), exact, strict=True):
        assert abs(value / truth - 1) < 0.025, (name, value, truth)
    assert describe(summary(total)).startswith("0 non-finite, 0 all-zero of 3,000; L2 norm")


def test_the_gates_exit_status_is_its_own() -> None:
    assert report_failure(QualityGateError("quality gate: …")) == EXIT_QUALITY_GATE == 4


def _config(tmp_path: Path, make_image: Any, output: str, bad: int, **knobs: Any) -> EmbedConfig:
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for i in range(IMAGES):
        name = f"bad{i:02d}.png" if i < bad else f"ok{i:02d}.png"
        (photos / name).write_bytes(make_image((20 + i, 16), fmt="PNG", seed=i))
    return EmbedConfig(
        input=str(photos),
        output=output,
        weights="random",
        batch_size=2,
        decode_batch_size=2,
        rows_per_file=2,
        commit_every=4,
        **knobs,
    )


def test_a_clean_run_records_its_vectors_statistics(
    ray_session, tmp_path, make_image, output_uri
) -> None:  # type: ignore[no-untyped-def]
    output, options = output_uri
    config = _config(tmp_path, make_image, output, bad=0, storage_options=options)
    record = execute_run(prepare_run(config), embedder=Poisoned)
    assert record.quality["vectors"] == IMAGES
    assert (record.quality["non_finite"], record.quality["zero"]) == (0, 0)
    (stored,) = read_manifest(output, storage_options=options).runs  # type: ignore[union-attr]
    assert stored.quality == record.quality  # in the manifest, as in the summary
    norms = np.linalg.norm(
        np.stack([vector(f"{config.input}/ok{i:02d}.png") for i in range(IMAGES)]), axis=1
    )
    assert abs(record.quality["norm"]["p50"] / np.median(norms) - 1) < 0.03


def test_a_nan_is_never_committed_unless_the_gate_is_off(
    ray_session, tmp_path, make_image, output_uri
) -> None:  # type: ignore[no-untyped-def]
    """One image in twelve embeds as NaN: the run stops before a file holding it is
    committed, naming it; what committed before it is finite. With --gate off the same run
    commits it, and its record counts it."""
    output, options = output_uri
    config = _config(tmp_path, make_image, output, bad=1, storage_options=options)
    bad = f"{config.input}/bad00.png"
    with pytest.raises(QualityGateError) as refused:
        execute_run(prepare_run(config), embedder=Poisoned)
    line = str(refused.value)
    assert line.startswith("quality gate: 1 of 2 vectors hold NaN"), line
    assert f"(worst: {bad}: {EMBEDDING_DIM} of {EMBEDDING_DIM} values" in line, line
    manifest = read_manifest(output, storage_options=options)
    if manifest is not None:  # checkpoints before the bad file: kept, and all finite
        table = read_embeddings(output, storage_options=options)
        assert bad not in table["uri"].to_pylist()
        assert np.isfinite(np.stack(table["embedding"].to_numpy(zero_copy_only=False))).all()
        assert manifest.runs[-1].status == "checkpointed"

    opened = config.__class__(**{**config.__dict__, "gate": "off"})
    record = execute_run(prepare_run(opened), embedder=Poisoned)
    assert record.status == "committed" and record.quality["non_finite"] == 1
    assert "1 non-finite" in describe(record.quality)
    uris = read_embeddings(output, storage_options=options)["uri"].to_pylist()
    assert sorted(uris) == sorted(f"{config.input}/{p.name}" for p in Path(config.input).iterdir())
