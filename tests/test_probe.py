"""The probe (pipeline.probe): a run re-embeds stored images and compares them with their
stored vectors before it commits anything; beyond the tolerance it stops (exit 4)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import stage_rows
from PIL import Image
from ray import cloudpickle

from pipeline.commit import commit_run
from pipeline.config import EmbedConfig
from pipeline.embed import ModelIdentity, ResNet50Embedder
from pipeline.manifest import RunCounts, RunRecord
from pipeline.output import Output
from pipeline.probe import describe_probe, pick_probes, probe_verdict
from pipeline.read import read_embeddings, read_manifest
from pipeline.run import execute_run, prepare_run
from pipeline.sink import QualityGateError

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SubtlyResized(ResNet50Embedder):
    """The real model stage, fed pixels resized as a changed library might: 224 -> 220 ->
    224, bilinear (a blur of a fraction of a pixel)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack(
            [
                np.asarray(
                    Image.fromarray(image)
                    .resize((220, 220), Image.Resampling.BILINEAR)
                    .resize(image.shape[:2][::-1], Image.Resampling.BILINEAR)
                )
                for image in batch["image"]
            ]
        )
        return super().__call__({**batch, "image": images})


class Broken(ResNet50Embedder):
    """The real model stage returning NaN for the probe's images, as a corrupted model might
    for some inputs."""

    def embed(self, images: np.ndarray) -> np.ndarray:
        out = super().embed(images)
        out[:] = np.nan
        return out


def _photos(folder: Path, make_image: Any, names: range) -> None:
    folder.mkdir(exist_ok=True)
    for i in names:
        (folder / f"{i:02d}.png").write_bytes(make_image((40 + i, 32), fmt="PNG", seed=i))


def test_the_probe_passes_the_same_configuration_and_stops_a_changed_resize(
    ray_session, tmp_path, make_image
) -> None:  # type: ignore[no-untyped-def]
    """Real ResNet50 (seeded random weights, fp32 on CPU): the same configuration re-embeds
    stored images within 1e-3; a resize a fraction of a pixel off does not, and the run
    commits nothing; --gate off commits it and records the probe's figures."""
    photos = tmp_path / "photos"
    _photos(photos, make_image, range(6))
    config = EmbedConfig(
        input=str(photos), output=str(tmp_path / "out"), weights="random", probe=4, batch_size=4
    )
    first = execute_run(prepare_run(config))
    assert "probe" not in first.quality  # a new table: nothing to compare with

    _photos(photos, make_image, range(6, 8))
    changed = prepare_run(config)
    with pytest.raises(QualityGateError) as stopped:
        execute_run(changed, embedder=SubtlyResized)
    line = str(stopped.value)
    assert line.startswith("quality gate: probe: 4 of 4 stored images re-embed beyond"), line
    assert "nothing committed" in line and str(photos) in line
    assert len(read_manifest(config.output).runs) == 1  # type: ignore[union-attr]

    same = execute_run(prepare_run(config))
    probe = same.quality["probe"]
    assert (probe["images"], probe["compared"], probe["passed"]) == (4, 4, True), probe
    assert probe["max_error"] < 1e-4 and probe["tolerance"] == 1e-3, probe
    assert same.counts.embedded == 2  # the probe's images are not written again
    assert read_embeddings(config.output).num_rows == 8
    assert describe_probe(probe).endswith("tolerance 0.001, passed")
    # Picked across runs, newest first, the same each time.
    manifest = read_manifest(config.output)
    assert manifest is not None
    picked = pick_probes(config.output, manifest, 4)
    runs = [p.file.split("run_id=")[1].split("/")[0] for p in picked]
    assert runs[0] == same.run_id and runs[1] == first.run_id and len(set(runs)) == 2
    assert picked == pick_probes(config.output, manifest, 4)

    _photos(photos, make_image, range(8, 9))
    opened = execute_run(
        prepare_run(dataclasses.replace(config, gate="off")), embedder=SubtlyResized
    )
    assert (
        opened.quality["probe"]["passed"] is False and opened.quality["probe"]["max_error"] > 1e-3
    )


def test_a_non_finite_probe_stops_the_run(ray_session, tmp_path, make_image) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    _photos(photos, make_image, range(3))
    config = EmbedConfig(
        input=str(photos), output=str(tmp_path / "out"), weights="random", probe=2, batch_size=4
    )
    execute_run(prepare_run(config))
    _photos(photos, make_image, range(3, 4))
    with pytest.raises(QualityGateError, match="quality gate: "):
        execute_run(prepare_run(config), embedder=Broken)
    assert len(read_manifest(config.output).runs) == 1  # type: ignore[union-attr]


def test_the_verdict_counts_compared_and_skipped_probes() -> None:
    results = [
        {"uri": "a", "error": 1e-7, "why": ""},
        {"uri": "b", "error": None, "why": "changed since"},
        {"uri": "c", "error": 2e-3, "why": ""},
    ]
    verdict = probe_verdict(results, 1e-3)
    assert (verdict["compared"], verdict["skipped"], verdict["worst"]) == (2, 1, "c")
    assert verdict["passed"] is False
    assert probe_verdict(results[:2], 1e-3)["passed"] is True
    assert probe_verdict([], 1e-3)["passed"] is True


def test_the_probe_spans_runs_and_files(output_uri) -> None:  # type: ignore[no-untyped-def]
    """One folder moved away must not leave the probe with nothing to compare: it takes its
    images from the runs in turn, newest first, and within a run from several files."""
    output, options = output_uri
    model = ModelIdentity(
        weights="random:seed=0", weights_sha256="00" * 32, normalized=False, precision="fp32"
    )
    for run_id, files in (("r1", 3), ("r2", 1)):
        staged: dict[str, list[str]] = {"embeddings": []}
        for f in range(files):
            uris = [f"/photos/{run_id}/{f}/{i}.png" for i in range(4)]
            staged["embeddings"] += stage_rows(output, run_id, uris, options, digests=True)[
                "embeddings"
            ]
        out = Output(output, options)
        record = RunRecord(
            run_id=run_id, input="/photos", counts=RunCounts(listed=4 * files), model=model,
            preprocessing={},
        )  # fmt: skip
        commit_run(out, out.snapshot(), record, staged=staged)
    manifest = read_manifest(output, storage_options=options)
    assert manifest is not None
    picked = pick_probes(output, manifest, 4, options)
    assert [p.file.split("run_id=")[1][:2] for p in picked] == ["r2", "r1", "r1", "r1"]
    assert len({p.file for p in picked}) == 4  # four files, not one file per run
    assert all(p.stored == (0.0,) * 2048 for p in picked)  # read with the pick
    assert picked == pick_probes(output, manifest, 4, options)
    eight = pick_probes(output, manifest, 8, options)
    assert eight[:4] == picked and len({p.uri for p in eight}) == 8
