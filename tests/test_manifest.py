"""The manifest's typed records: one JSON layout, read back as it was written."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.embed import ModelIdentity
from pipeline.manifest import Manifest, RunCounts, RunRecord
from pipeline.write import file_metadata

MODEL = ModelIdentity(
    weights="imagenet:IMAGENET1K_V2", weights_sha256="ab" * 32, normalized=True, precision="bf16"
)


def _run(run_id: str, **files: list[str]) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        input="s3://bucket/photos",
        counts=RunCounts(listed=3, skipped_by_extension=1, embedded=2, failed=1),
        model=MODEL,
        preprocessing={"mode": "center-crop", "resize_size": 232},
        started_at="2026-11-26T00:00:00Z",
        finished_at="2026-11-26T00:00:09Z",
        wall_seconds=9.0,
        images_per_second=0.222,
        pipeline_version="0.1.0",
        files=files,
    )


def test_records_survive_json() -> None:
    manifest, superseded = Manifest.empty().with_run(_run("r1", embeddings=["embeddings/a"]))
    manifest, _ = manifest.with_run(_run("r2", errors=["errors/b"]))
    assert superseded == []
    text = manifest.to_bytes()
    assert Manifest.from_json(json.loads(text)) == manifest
    data = json.loads(text)
    assert data["current"] == {
        "embeddings": ["embeddings/a"],
        "errors": ["errors/b"],
        "deletions": [],
    }
    assert data["model"]["precision"] == "bf16" and data["runs"][1]["status"] == "committed"


def test_a_full_run_supersedes_every_earlier_file() -> None:
    manifest, _ = Manifest.empty().with_run(_run("r1", embeddings=["embeddings/a"]))
    manifest, superseded = manifest.with_run(_run("r2", embeddings=["embeddings/b"]), replace=True)
    assert superseded == ["embeddings/a"] and manifest.current["embeddings"] == ["embeddings/b"]


def test_files_and_manifest_carry_the_same_model_identity() -> None:
    meta = file_metadata(model=MODEL, preprocessing={"mode": "squash"}, run_id="r1")
    assert {k: meta[k] for k in MODEL.to_parquet_metadata()} == MODEL.to_parquet_metadata()
    assert meta["model"] == "resnet50" and meta["precision"] == "bf16"
    assert meta["normalized"] == "true" and meta["embedding_dim"] == "2048"
    assert ModelIdentity.from_json(MODEL.to_json()) == MODEL


def test_a_foreign_json_file_is_not_a_manifest() -> None:
    with pytest.raises(ValueError, match="not an embed-images manifest"):
        Manifest.from_json({"runs": []})


def test_the_run_log_is_bounded_and_old_runs_files_stay_committed() -> None:
    from pipeline.manifest import RUN_LOG

    manifest = Manifest.empty()
    for n in range(RUN_LOG + 20):
        run_id = f"r{n:04d}"
        manifest, _ = manifest.with_run(_run(run_id, embeddings=[f"embeddings/run_id={run_id}/a"]))
    assert len(manifest.runs) == RUN_LOG
    assert manifest.runs[0].run_id == "r0020"
    assert len(manifest.current["embeddings"]) == RUN_LOG + 20  # every file stays current
    assert "r0000" in manifest.committed_run_ids()  # its folder is not "uncommitted"


def test_a_checkpoint_replaces_the_runs_record_and_adds_its_files() -> None:
    from pipeline.manifest import CHECKPOINTED

    first = dataclasses.replace(
        _run("r1", embeddings=["embeddings/run_id=r1/a"]), status=CHECKPOINTED
    )
    manifest, _ = Manifest.empty().with_run(first)
    manifest, _ = manifest.with_run(_run("r1", embeddings=["embeddings/run_id=r1/b"]))
    assert [r.run_id for r in manifest.runs] == ["r1"]
    assert manifest.runs[0].files["embeddings"] == [
        "embeddings/run_id=r1/a",
        "embeddings/run_id=r1/b",
    ]
    assert manifest.current["embeddings"] == manifest.runs[0].files["embeddings"]
    # A --full run's last commit supersedes earlier runs' files, not its own checkpoints',
    # which stay out of the current table (pending) until then.
    before = manifest.current
    manifest, _ = manifest.with_run(
        dataclasses.replace(first, run_id="r2", files={"embeddings": ["embeddings/run_id=r2/a"]}),
        pending=True,
    )
    assert manifest.current == before
    assert manifest.pending is not None
    assert manifest.pending.files["embeddings"] == ["embeddings/run_id=r2/a"]
    manifest, superseded = manifest.with_run(
        _run("r2", embeddings=["embeddings/run_id=r2/b"]), replace=True
    )
    assert superseded == ["embeddings/run_id=r1/a", "embeddings/run_id=r1/b"]
    assert manifest.current["embeddings"] == ["embeddings/run_id=r2/a", "embeddings/run_id=r2/b"]
