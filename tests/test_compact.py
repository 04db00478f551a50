"""Compaction: only current rows stay, nightly runs go on, and a killed compaction loses nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest

from bench.overhead import Identity
from pipeline.config import EmbedConfig
from pipeline.read import read_embeddings, read_manifest
from pipeline.run import execute_run, prepare_run


def _plain_rows(output: Path | str, fs: Any = None) -> list[tuple[str, str]]:
    """The rows a plain ``pyarrow.dataset`` read of the embeddings sees (on ``fs``: S3)."""
    plain = pads.dataset(
        str(output).removeprefix("s3://") + "/embeddings",
        filesystem=fs,
        format="parquet",
        partitioning="hive",
    ).to_table(columns=["uri", "run_id"])
    return sorted(zip(plain["uri"].to_pylist(), plain["run_id"].to_pylist(), strict=True))


def _plain_equals_current(
    output: Path | str, fs: Any = None, options: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """A plain ``pyarrow.dataset`` read of the embeddings equals ``read_embeddings``."""
    current = read_embeddings(str(output), columns=["uri", "run_id"], storage_options=options)
    rows = sorted(zip(current["uri"].to_pylist(), current["run_id"].to_pylist(), strict=True))
    assert _plain_rows(output, fs) == rows
    return rows


@pytest.mark.slow
def test_compaction_leaves_only_current_rows_and_nightly_runs_go_on(
    tmp_path, make_image, ray_session
) -> None:  # type: ignore[no-untyped-def]
    from pipeline.compact import compact

    photos, output = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for i in range(5):
        (photos / f"p{i}.jpg").write_bytes(make_image((20 + i, 16), seed=i))
    options = dict(input=str(photos), output=str(output), weights="random")
    execute_run(prepare_run(EmbedConfig(**options)), embedder=Identity)
    (photos / "p0.jpg").write_bytes(make_image((30, 30), seed=50))  # changed
    (photos / "p1.jpg").unlink()  # deleted
    (photos / "p5.jpg").write_bytes(make_image((24, 18), seed=5))  # new
    second = execute_run(prepare_run(EmbedConfig(**options)), embedder=Identity)
    assert (second.counts.embedded, second.counts.deleted) == (2, 1)
    before = sorted(read_embeddings(str(output))["uri"].to_pylist())
    record = compact(str(output), rows_per_file=2)
    manifest = read_manifest(str(output))
    assert manifest is not None and manifest.runs[-1].status == "compacted"
    assert not manifest.current["deletions"]  # applied
    assert all(f"run_id={record.run_id}/" in p for p in manifest.current["embeddings"])
    assert len(manifest.current["embeddings"]) == 3  # 5 rows, 2 a file
    rows = _plain_equals_current(output)
    assert [u for u, _ in rows] == before
    assert {r for _, r in rows} == {record.run_id}

    (photos / "p6.jpg").write_bytes(make_image((22, 18), seed=6))
    third = execute_run(prepare_run(EmbedConfig(**options)), embedder=Identity)
    assert (third.counts.embedded, third.counts.unchanged) == (1, 5)
    assert [u for u, _ in _plain_equals_current(output)] == sorted(
        [*before, str(photos / "p6.jpg")]
    )
    # Nothing new: the listing ends before any work, and the run commits that.
    fourth = execute_run(prepare_run(EmbedConfig(**options)), embedder=Identity)
    assert (fourth.counts.embedded, fourth.counts.unchanged) == (0, 6)
    assert fourth.status == "committed"


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("killed", ["before its manifest", "after its manifest"])
def test_a_compaction_killed_midway_loses_nothing(
    tmp_path, make_image, ray_session, monkeypatch, request, killed, store
) -> None:  # type: ignore[no-untyped-def]
    from pipeline.compact import compact
    from pipeline.output import Output

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.jpg").write_bytes(make_image((20 + i, 16), seed=i))
    fs, options, s3 = None, {}, {}
    if store == "s3":  # the manifest is a conditional PUT there, files are server-side copies
        fs, bucket = request.getfixturevalue("s3_bucket")
        options = {"endpoint_url": request.getfixturevalue("s3_endpoint")}
        output: str = f"s3://{bucket}/out"
        s3 = {"endpoint_url": options["endpoint_url"]}
    else:
        output = str(tmp_path / "out")
    config = dict(input=str(photos), output=output, weights="random", **s3)
    execute_run(prepare_run(EmbedConfig(**config)), embedder=Identity)
    (photos / "p0.jpg").write_bytes(make_image((30, 30), seed=50))
    execute_run(prepare_run(EmbedConfig(**config)), embedder=Identity)

    def current() -> list[str]:
        uris = read_embeddings(output, columns=["uri"], storage_options=options)["uri"]
        return sorted(uris.to_pylist())

    before = current()
    plain_before = _plain_rows(output, fs)

    def power_cut(*args: Any, **kwargs: Any) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        if killed == "before its manifest":
            patch.setattr("pipeline.commit.write_manifest", power_cut)
        else:
            patch.setattr(Output, "discard_staging", power_cut)
        with pytest.raises(OSError, match="power cut"):
            compact(output, storage_options=options)
    # Readers that go through the manifest see each image once, either way.
    assert current() == before
    # What the next run does first, once the leftovers are older than the retention (0
    # here) and the compaction's process is gone (it is this test's, which lives on): no
    # file of the compaction, or of before it, is left beside the table its manifest names.
    monkeypatch.setattr("pipeline.output._process_may_live", lambda lease: False)
    time.sleep(1.1)  # S3 stamps whole seconds: a file of this second is not yet older than 0
    out = Output(output, options)
    assert out.remove_orphans(retention=0) > 0
    status = read_manifest(output, storage_options=options).runs[-1].status  # type: ignore[union-attr]
    if killed == "before its manifest":
        assert status == "committed"
        assert _plain_rows(output, fs) == plain_before  # the table before (with its changed row)
    else:
        assert status == "compacted"
        assert [u for u, _ in _plain_equals_current(output, fs, options)] == before
