"""The output: staged files move into the tables, the manifest is written last, readers see it."""

from __future__ import annotations

import json
import threading

import pyarrow.dataset as pads
import pytest
from conftest import run_args, stage_rows

from pipeline.commit import commit_run, write_manifest
from pipeline.embed import ModelIdentity
from pipeline.manifest import RunCounts, RunRecord
from pipeline.output import ConcurrentCommitError, Output
from pipeline.read import read_embeddings, read_manifest

MODEL = ModelIdentity(
    weights="random:seed=0", weights_sha256="00" * 32, normalized=False, precision="fp32"
)


def _record(run_id: str) -> RunRecord:
    return RunRecord(
        run_id=run_id, input="/x", counts=RunCounts(listed=1), model=MODEL, preprocessing={}
    )


_stage = stage_rows


def _commit(output: str, run_id: str, staged: dict[str, list[str]]) -> None:
    out = Output(output)
    commit_run(out, out.snapshot(), _record(run_id), staged=staged)


def test_commit_then_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    output = str(tmp_path / "out")
    staged = _stage(output, "run1", ["/x/1.png", "/x/2.png"])
    # Before the commit a reader sees nothing.
    assert read_manifest(output) is None
    with pytest.raises(FileNotFoundError):
        read_embeddings(output)
    out = Output(output)
    manifest = commit_run(out, out.snapshot(), _record("run1"), staged=staged).manifest
    assert manifest is not None
    assert manifest.runs[0].files["embeddings"][0].startswith("embeddings/run_id=run1/")
    assert not (tmp_path / "out" / "_staging").exists()
    table = read_embeddings(output)
    assert sorted(table["uri"].to_pylist()) == ["/x/1.png", "/x/2.png"]
    assert set(table["run_id"].to_pylist()) == {"run1"}
    plain = pads.dataset(output + "/embeddings", format="parquet", partitioning="hive").to_table()
    assert sorted(plain["uri"].to_pylist()) == sorted(table["uri"].to_pylist())
    on_disk = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert on_disk == manifest.to_json()
    assert read_manifest(output) == manifest


def test_uncommitted_partitions_are_discarded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    output = str(tmp_path / "out")
    _commit(output, "good", _stage(output, "good", ["/a.png"]))
    # A run that died after moving files but before its manifest.
    orphan = tmp_path / "out" / "embeddings" / "run_id=dead"
    orphan.mkdir(parents=True)
    (orphan / "part-x.parquet").write_bytes(b"half")
    _stage(output, "also-dead", ["/b.png"])
    out = Output(output)
    assert out.remove_orphans(retention=0) == 2
    assert not orphan.exists() and not (tmp_path / "out" / "_staging").exists()
    assert read_embeddings(output)["uri"].to_pylist() == ["/a.png"]


def test_second_run_appends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    output = str(tmp_path / "out")
    _commit(output, "r1", _stage(output, "r1", ["/a.png"]))
    _commit(output, "r2", _stage(output, "r2", ["/b.png"]))
    manifest = read_manifest(output)
    assert manifest is not None and [r.run_id for r in manifest.runs] == ["r1", "r2"]
    assert sorted(read_embeddings(output)["uri"].to_pylist()) == ["/a.png", "/b.png"]


def test_a_commit_refuses_when_another_run_committed_meanwhile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    output = str(tmp_path / "out")
    out = Output(output)
    assert out.snapshot().version is None
    _commit(output, "r1", _stage(output, "r1", ["/a.png"]))
    seen_by_r2 = out.snapshot()
    # r3 starts and commits while r2 is still running.
    commit_run(out, out.snapshot(), _record("r3"), staged=_stage(output, "r3", ["/c.png"]))
    staged = _stage(output, "r2", ["/b.png"])
    with pytest.raises(ConcurrentCommitError, match="another run committed"):
        commit_run(out, seen_by_r2, _record("r2"), staged=staged)
    manifest = read_manifest(output)
    assert manifest is not None and [r.run_id for r in manifest.runs] == ["r1", "r3"]
    assert not list((tmp_path / "out" / "embeddings").glob("run_id=r2*"))  # nothing moved


def test_local_commits_are_serialized_so_a_racing_commit_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # r3 is in the middle of its commit (it has passed its version check and is about to
    # replace the manifest) when r2, which started from the same version, tries to commit.
    # r2 must wait for r3 and then be refused, not check the stale version and overwrite.
    output = str(tmp_path / "out")
    _commit(output, "r1", _stage(output, "r1", ["/a.png"]))
    out = Output(output)
    seen = out.snapshot()
    staged = _stage(output, "r2", ["/b.png"])
    outcome: list[BaseException | object] = []

    def commit_r2() -> None:
        try:
            outcome.append(commit_run(Output(output), seen, _record("r2"), staged=staged))
        except ConcurrentCommitError as exc:
            outcome.append(exc)

    with out.lock():
        racer = threading.Thread(target=commit_r2)
        racer.start()
        racer.join(1.0)
        assert racer.is_alive() and not outcome  # r2 waits for r3's commit to finish
        assert seen.manifest is not None
        r3, _ = seen.manifest.with_run(_record("r3"))
        write_manifest(out, r3.to_bytes(), seen.version)
    racer.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ConcurrentCommitError)
    manifest = read_manifest(output)
    assert manifest is not None and [r.run_id for r in manifest.runs] == ["r1", "r3"]
    assert not list((tmp_path / "out" / "embeddings").glob("run_id=r2*"))  # nothing moved


def test_s3_manifest_puts_are_conditional(s3_bucket, s3_endpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s3, bucket = s3_bucket
    out = Output(f"s3://{bucket}/out", {"endpoint_url": s3_endpoint})
    write_manifest(out, b'{"v": 1}', None)  # If-None-Match: * on a new key
    with pytest.raises(ConcurrentCommitError):
        write_manifest(out, b'{"v": 2}', None)  # ...refused once it exists
    etag = out.version()
    assert etag
    write_manifest(out, b'{"v": 3}', etag)  # If-Match: the ETag we read
    with pytest.raises(ConcurrentCommitError):
        write_manifest(out, b'{"v": 4}', etag)  # stale ETag: refused
    assert s3.cat_file(f"{bucket}/out/_manifest.json") == b'{"v": 3}'


@pytest.mark.slow
def test_a_run_reads_the_manifest_once(tmp_path, make_image, ray_session, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The output's manifest is read once per run for its work: its snapshot serves the model
    check, the diff and the commit (which compares versions with a stat, and reads nothing).
    The clean-up at the start reads it once more, fresh, by design: it must never decide on
    a snapshot another process may have overtaken."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.cli import main

    photos, output = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.jpg").write_bytes(make_image((40 + i, 30), seed=i))
    reads: list[str] = []
    counted_open = LocalFileSystem._open

    def counting_open(self, path, mode="rb", *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith("_manifest.json") and "r" in mode:
            reads.append(str(path))
        return counted_open(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", counting_open)
    args = run_args(photos, output)
    assert main(args) == 0  # a new output: two attempts, which find no manifest
    assert len(reads) == 2, reads
    (photos / "p3.jpg").write_bytes(make_image((50, 30), seed=3))
    assert main(args) == 0  # incremental: the check, the diff and the commit; the clean-up
    assert len(reads) == 4, reads
    manifest = read_manifest(output)
    assert manifest is not None and [r.counts.embedded for r in manifest.runs] == [3, 1]


def test_the_dataset_reader_gives_the_current_table(tmp_path, ray_session) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    from pipeline.read import read_embeddings_dataset

    output = str(tmp_path / "out")
    _commit(output, "r1", _stage(output, "r1", ["/a.png", "/b.png", "/c.png"]))
    _commit(output, "r2", _stage(output, "r2", ["/b.png", "/d.png"]))  # /b.png changed
    out = Output(output)
    commit_run(out, out.snapshot(), _record("r3"), staged={}, deleted_uris=pa.array(["/c.png"]))

    def rows(table: pa.Table) -> list[tuple[str, str]]:
        return sorted(zip(table["uri"].to_pylist(), table["run_id"].to_pylist(), strict=True))

    expected = [("/a.png", "r1"), ("/b.png", "r2"), ("/d.png", "r2")]
    assert rows(read_embeddings(output)) == expected
    dataset = read_embeddings_dataset(output, columns=["uri", "run_id", "embedding"])
    table = pa.concat_tables(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    assert rows(table) == expected
    assert table.column_names == ["uri", "run_id", "embedding"]
    assert rows(pa.Table.from_pandas(read_embeddings_dataset(output).to_pandas())) == expected


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_racing_run_is_refused_between_the_checkpoints_of_another(
    tmp_path, request, store
) -> None:  # type: ignore[no-untyped-def]
    """The refusal is S3's conditional PUT there, a lock file and a version check locally."""
    import dataclasses

    if store == "s3":
        fs, bucket = request.getfixturevalue("s3_bucket")
        output = f"s3://{bucket}/out"
        options = {"endpoint_url": request.getfixturevalue("s3_endpoint")}
    else:
        fs, output, options = None, str(tmp_path / "out"), {}
    out = Output(output, options)
    start = out.snapshot()  # both runs start from the same (empty) output
    a1 = commit_run(
        out,
        start,
        dataclasses.replace(_record("a"), status="checkpointed"),
        staged=_stage(output, "a", ["/1.png"], options),
        final=False,
    )
    with pytest.raises(ConcurrentCommitError):  # run b's first commit: a committed meanwhile
        commit_run(
            out, start, _record("b"), staged=_stage(output, "b", ["/1.png", "/2.png"], options)
        )
    commit_run(out, a1, _record("a"), staged=_stage(output, "a", ["/2.png"], options))  # a goes on
    out.remove_orphans(retention=0)  # what the next run does first
    current = read_embeddings(output, storage_options=options)["uri"].to_pylist()
    assert sorted(current) == ["/1.png", "/2.png"]
    plain = pads.dataset(
        output.removeprefix("s3://") + "/embeddings",
        filesystem=fs,
        format="parquet",
        partitioning="hive",
    ).to_table()
    assert sorted(plain["uri"].to_pylist()) == ["/1.png", "/2.png"]  # each image once
    manifest = read_manifest(output, storage_options=options)
    assert manifest is not None and [(r.run_id, r.status) for r in manifest.runs] == [
        ("a", "committed")
    ]
