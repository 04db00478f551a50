"""Commit: staged files move into the tables, the manifest is written last, readers see it."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline.manifest import (
    commit_run,
    discard_uncommitted,
    read_embeddings,
    read_manifest,
    staging_uri,
)
from pipeline.write import file_metadata, write_batch

METADATA = file_metadata(
    run_id="r",
    weights={"weights": "random:seed=0", "weights_sha256": "00" * 32},
    preprocessing={},
    normalized=False,
    pipeline_version="test",
)


def _stage(output: str, run_id: str, uris: list[str]) -> dict[str, list[str]]:
    n = len(uris)
    batch = {
        "uri": np.array(uris, dtype=object),
        "file_size": np.ones(n, dtype=np.int64),
        "original_width": np.ones(n, dtype=np.int32),
        "original_height": np.ones(n, dtype=np.int32),
        "format": np.array(["PNG"] * n, dtype=object),
        "error_type": np.array([""] * n, dtype=object),
        "error_message": np.array([""] * n, dtype=object),
        "embedding": np.zeros((n, 2048), dtype=np.float32),
        "source_version": np.array(["v1"] * n, dtype=object),
    }
    out = write_batch(
        batch, staging_uri=staging_uri(output, run_id), storage_options={}, metadata=METADATA
    )
    return {"embeddings": list(out["path"])}


def test_commit_then_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    output = str(tmp_path / "out")
    staged = _stage(output, "run1", ["/x/1.png", "/x/2.png"])
    # Before the commit a reader sees nothing.
    assert read_manifest(output) is None
    with pytest.raises(FileNotFoundError):
        read_embeddings(output)
    manifest = commit_run(output, run={"run_id": "run1", "counts": {"listed": 2}}, staged=staged)
    assert manifest["runs"][0]["files"]["embeddings"][0].startswith("embeddings/run_id=run1/")
    assert not (tmp_path / "out" / "_staging").exists()
    table = read_embeddings(output)
    assert sorted(table["uri"].to_pylist()) == ["/x/1.png", "/x/2.png"]
    assert set(table["run_id"].to_pylist()) == {"run1"}
    plain = pads.dataset(output + "/embeddings", format="parquet", partitioning="hive").to_table()
    assert sorted(plain["uri"].to_pylist()) == sorted(table["uri"].to_pylist())
    on_disk = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert on_disk == manifest


def test_uncommitted_partitions_are_discarded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    output = str(tmp_path / "out")
    commit_run(output, run={"run_id": "good"}, staged=_stage(output, "good", ["/a.png"]))
    # A run that died after moving files but before its manifest.
    orphan = tmp_path / "out" / "embeddings" / "run_id=dead"
    orphan.mkdir(parents=True)
    (orphan / "part-x.parquet").write_bytes(b"half")
    _stage(output, "also-dead", ["/b.png"])
    assert discard_uncommitted(output) == 2
    assert not orphan.exists() and not (tmp_path / "out" / "_staging").exists()
    assert read_embeddings(output)["uri"].to_pylist() == ["/a.png"]


def test_second_run_appends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    output = str(tmp_path / "out")
    commit_run(output, run={"run_id": "r1"}, staged=_stage(output, "r1", ["/a.png"]))
    commit_run(output, run={"run_id": "r2"}, staged=_stage(output, "r2", ["/b.png"]))
    manifest = read_manifest(output)
    assert manifest is not None and [r["run_id"] for r in manifest["runs"]] == ["r1", "r2"]
    assert sorted(read_embeddings(output)["uri"].to_pylist()) == ["/a.png", "/b.png"]


def test_a_commit_refuses_when_another_run_committed_meanwhile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.manifest import ConcurrentCommitError, manifest_version

    output = str(tmp_path / "out")
    assert manifest_version(output) is None
    commit_run(
        output, run={"run_id": "r1"}, staged=_stage(output, "r1", ["/a.png"]), expected_version=None
    )
    seen_by_r2 = manifest_version(output)
    # r3 starts and commits while r2 is still running.
    commit_run(
        output,
        run={"run_id": "r3"},
        staged=_stage(output, "r3", ["/c.png"]),
        expected_version=seen_by_r2,
    )
    staged = _stage(output, "r2", ["/b.png"])
    with pytest.raises(ConcurrentCommitError, match="another run committed"):
        commit_run(output, run={"run_id": "r2"}, staged=staged, expected_version=seen_by_r2)
    manifest = read_manifest(output)
    assert manifest is not None and [r["run_id"] for r in manifest["runs"]] == ["r1", "r3"]
    assert not list((tmp_path / "out" / "embeddings").glob("run_id=r2*"))  # nothing moved


def test_local_commits_are_serialized_so_a_racing_commit_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # r3 is in the middle of its commit (it has passed its version check and is about to
    # replace the manifest) when r2, which started from the same version, tries to commit.
    # r2 must wait for r3 and then be refused, not check the stale version and overwrite.
    from pipeline import manifest as m

    output = str(tmp_path / "out")
    commit_run(output, run={"run_id": "r1"}, staged=_stage(output, "r1", ["/a.png"]))
    seen = m.manifest_version(output)
    staged = _stage(output, "r2", ["/b.png"])
    outcome: list[BaseException | dict] = []

    def commit_r2() -> None:
        try:
            outcome.append(
                commit_run(output, run={"run_id": "r2"}, staged=staged, expected_version=seen)
            )
        except m.ConcurrentCommitError as exc:
            outcome.append(exc)

    fs, root = m.open_fs(output, {})
    with m._commit_lock(fs, root):
        racer = threading.Thread(target=commit_r2)
        racer.start()
        racer.join(1.0)
        assert racer.is_alive() and not outcome  # r2 waits for r3's commit to finish
        r3 = dict(read_manifest(output) or {})
        r3["runs"] = [*r3["runs"], {"run_id": "r3", "files": {}}]
        m._write_atomically(fs, f"{root}/{m.MANIFEST_NAME}", json.dumps(r3).encode(), seen, output)
    racer.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], m.ConcurrentCommitError)
    manifest = read_manifest(output)
    assert manifest is not None and [r["run_id"] for r in manifest["runs"]] == ["r1", "r3"]
    assert not list((tmp_path / "out" / "embeddings").glob("run_id=r2*"))  # nothing moved


def test_s3_manifest_puts_are_conditional(s3_bucket, s3_endpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline import manifest as m

    s3, bucket = s3_bucket
    output = f"s3://{bucket}/out"
    options = {"endpoint_url": s3_endpoint}
    fs, root = m.open_fs(output, options)
    path = f"{root}/{m.MANIFEST_NAME}"
    m._write_atomically(fs, path, b'{"v": 1}', None, output)  # If-None-Match: * on a new key
    with pytest.raises(m.ConcurrentCommitError):
        m._write_atomically(fs, path, b'{"v": 2}', None, output)  # ...refused once it exists
    etag = m.manifest_version(output, storage_options=options)
    assert etag
    m._write_atomically(fs, path, b'{"v": 3}', etag, output)  # If-Match: the ETag we read
    with pytest.raises(m.ConcurrentCommitError):
        m._write_atomically(fs, path, b'{"v": 4}', etag, output)  # stale ETag: refused
    assert s3.cat_file(f"{bucket}/out/{m.MANIFEST_NAME}") == b'{"v": 3}'
