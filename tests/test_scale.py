"""At scale: the listing streams into the run, and the driver keeps only the books."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from conftest import kill_stalled_driver

from bench.overhead import Identity
from pipeline.config import EmbedConfig
from pipeline.read import read_embeddings, read_manifest
from pipeline.run import execute_run, prepare_run


def marking_identity(marker: str) -> type[Identity]:
    """The bench's identity model stage, leaving ``marker`` once it has seen a batch."""

    class Marking(Identity):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            Path(marker).touch()
            return super().__call__(batch)

    return Marking


def _zero_byte_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"{i:05d}.jpg").write_bytes(b"")  # an `empty` error row each: no decode


@pytest.mark.slow
def test_work_starts_while_the_listing_goes_on(tmp_path, ray_session, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pipeline import incremental

    photos, marker = tmp_path / "photos", tmp_path / "model-saw-a-batch"
    _zero_byte_images(photos, 600)
    real = incremental.list_images

    def gated(*args: Any, **kwargs: Any) -> Iterator[pa.Table]:
        """The listing holds back its second chunk until the model stage has had a batch:
        a run that waits for the whole listing before it starts would never get one."""
        for n, chunk in enumerate(real(*args, **kwargs)):
            if n == 1:
                deadline = time.time() + 120
                while not marker.exists():
                    assert time.time() < deadline, "no batch reached the model mid-listing"
                    time.sleep(0.1)
            yield chunk

    monkeypatch.setattr(incremental, "list_images", gated)
    monkeypatch.setattr(incremental, "LISTING_BLOCK_ROWS", 256)  # 600 images: three chunks
    # Ray Data hands a read task's output on by the block (128 MiB by default): a block
    # here is one chunk of the listing.
    import ray

    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "target_max_block_size", 16 * 1024)
    config = EmbedConfig(
        input=str(photos), output=str(tmp_path / "out"), weights="random", max_error_rate=1.0
    )
    record = execute_run(prepare_run(config), embedder=marking_identity(str(marker)))
    assert record.counts.listed == 600 and record.counts.failed == 600
    assert read_embeddings(str(tmp_path / "out"), table="errors").num_rows == 600


@pytest.mark.slow
def test_a_runs_input_list_is_read_by_ray_data_not_the_driver(
    tmp_path, ray_session, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from pipeline.inventory import InputList
    from pipeline.run import dry_run

    photos = tmp_path / "photos"
    _zero_byte_images(photos, 300)
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p}\n" for p in sorted(photos.iterdir())) + "/elsewhere/x.jpg\n")

    def not_here(self: InputList, entry: Any) -> Iterator[pa.Table]:
        raise AssertionError(f"the driver read {entry.path}")

    # Patched in this process only: Ray's workers import the module afresh.
    monkeypatch.setattr(InputList, "read", not_here)
    config = EmbedConfig(
        input=str(photos),
        output=str(tmp_path / "out"),
        input_list=str(listed),
        weights="random",
        max_error_rate=1.0,
    )
    with pytest.raises(AssertionError, match="the driver read"):
        dry_run(config)  # no Ray there: the driver reads the list itself, so the patch bites
    record = execute_run(prepare_run(config), embedder=Identity)
    assert record.counts.listed == 300 and record.counts.failed == 300
    assert read_embeddings(str(tmp_path / "out"), table="errors").num_rows == 300


ROOT = Path(__file__).resolve().parents[1]


def _rows_once(
    output: Path | str, table: str, fs: Any = None, options: dict[str, str] | None = None
) -> list[str]:
    """The current rows' URIs, each once, and the plain dataset read (on ``fs``) agrees."""
    uris = read_embeddings(str(output), table=table, storage_options=options)["uri"].to_pylist()
    assert len(uris) == len(set(uris))
    plain = pads.dataset(
        f"{str(output).removeprefix('s3://')}/{table}",
        filesystem=fs,
        format="parquet",
        partitioning="hive",
    ).to_table()
    assert sorted(plain["uri"].to_pylist()) == sorted(uris)  # no uncommitted or doubled rows
    return uris


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_run_killed_between_checkpoints_keeps_them_and_the_rerun_does_the_rest(
    tmp_path, ray_session, capsys, request, store
) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    _zero_byte_images(photos, 300)
    fs, read, s3 = None, {}, {}
    if store == "s3":  # checkpoints are conditional PUTs there, files server-side copies
        fs, bucket = request.getfixturevalue("s3_bucket")
        output: str = f"s3://{bucket}/out"
        read = {"endpoint_url": request.getfixturevalue("s3_endpoint")}
        s3 = {"endpoint_url": read["endpoint_url"]}
    else:
        output = str(tmp_path / "out")
    options = dict(
        input=str(photos),
        output=output,
        weights="random",
        max_error_rate=1.0,
        batch_size=25,
        decode_batch_size=25,
        rows_per_file=25,
        commit_every=50,
        **s3,
    )

    def between_checkpoints() -> bool:
        manifest = read_manifest(output, storage_options=read)
        return manifest is not None and manifest.runs[-1].checkpoints >= 2

    # The model stage stalls after eight batches (200 images): the kill lands between
    # checkpoints (after the third, at 150), with work left.
    kill_stalled_driver(
        tmp_path,
        options,
        stage="bench.overhead:Identity",
        stall_after=8,
        ready=between_checkpoints,
    )
    manifest = read_manifest(output, storage_options=read)
    assert manifest is not None and manifest.runs[-1].status == "checkpointed"
    from pipeline.cli import main

    endpoint = ["--endpoint-url", read["endpoint_url"]] if read else []
    assert main(["status", output, *endpoint]) == 0  # shows how far the killed run got
    assert f"checkpointed ({manifest.runs[-1].checkpoints + 1})" in capsys.readouterr().out
    kept = _rows_once(output, "errors", fs, read)  # zero-byte files: an `empty` row each
    assert len(kept) >= 0.4 * 300, len(kept)  # killed at 50 %: 150 committed

    # Retention 0: the killed run's leftovers go at once (by default they wait an hour).
    rerun = EmbedConfig(**options, cleanup_retention=0)
    record = execute_run(prepare_run(rerun), embedder=Identity)
    assert record.counts.known_failed == len(kept)  # committed ones are not redone
    assert record.counts.failed == 300 - len(kept)
    done = _rows_once(output, "errors", fs, read)
    assert sorted(done) == sorted(str(p) for p in photos.iterdir())
    staging = f"{output.removeprefix('s3://')}/_staging"
    assert not (fs.exists(staging) if fs is not None else Path(staging).exists())


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


@pytest.mark.slow
def test_checkpoints_commit_to_s3_and_a_killed_run_resumes(
    tmp_path, ray_session, s3_bucket, s3_endpoint
) -> None:  # type: ignore[no-untyped-def]
    """On S3 a checkpoint's manifest PUT is conditional on the ETag the run's previous PUT
    returned: a run of several checkpoints commits each, and one that dies mid-way resumes."""
    s3, bucket = s3_bucket
    photos, output = tmp_path / "photos", f"s3://{bucket}/out"
    _zero_byte_images(photos, 120)
    options = dict(
        input=str(photos),
        output=output,
        weights="random",
        max_error_rate=1.0,
        endpoint_url=s3_endpoint,
        batch_size=10,
        decode_batch_size=10,
        rows_per_file=10,
        commit_every=20,
    )
    read = {"endpoint_url": s3_endpoint}

    class DiesAt70(Identity):
        """Fails for good once 70 images have gone through and two checkpoints are in the
        manifest: the run stops between checkpoints, as a killed one would."""

        seen = 0

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            type(self).seen += len(batch["uri"])
            if type(self).seen > 70:
                deadline = time.time() + 120
                while time.time() < deadline:
                    manifest = read_manifest(output, storage_options=read)
                    if manifest is not None and manifest.runs[-1].checkpoints >= 1:
                        break
                    time.sleep(0.2)
                raise ValueError("model stage down")
            return super().__call__(batch)

    with pytest.raises(Exception, match="model stage down|pipeline failed"):
        execute_run(prepare_run(EmbedConfig(**options)), embedder=DiesAt70)
    manifest = read_manifest(output, storage_options=read)
    assert manifest is not None and manifest.runs[-1].status == "checkpointed"
    kept = read_embeddings(output, storage_options=read, table="errors")["uri"].to_pylist()
    assert len(kept) >= 40 and len(kept) == len(set(kept))  # two checkpoints of 20 at least

    record = execute_run(prepare_run(EmbedConfig(**options)), embedder=Identity)
    assert record.counts.known_failed == len(kept) and record.counts.failed == 120 - len(kept)
    assert record.checkpoints >= 1  # this run's own checkpoints, on S3 too
    done = read_embeddings(output, storage_options=read, table="errors")["uri"].to_pylist()
    assert sorted(done) == sorted(str(p) for p in photos.iterdir())
    plain = pads.dataset(f"{bucket}/out/errors", filesystem=s3, format="parquet").to_table()
    assert sorted(plain["uri"].to_pylist()) == sorted(done)  # no stray or doubled rows


def test_a_plan_sizes_its_own_blocks() -> None:
    """Smaller blocks and more of them ahead, in the plan's own DataContext: a smaller size
    set before is kept, and the process's context is left as it was."""
    import ray

    from pipeline.plan import PLAN_BLOCK_BYTES, TASK_BLOCKS_AHEAD, size_blocks

    process = ray.data.DataContext.get_current()
    ahead = "_max_num_blocks_in_streaming_gen_buffer"
    # A private field: this fails if a Ray upgrade drops it, rather than setting a dead one.
    assert ahead in vars(ray.data.DataContext())
    before = (process.target_max_block_size, getattr(process, ahead))
    dataset = ray.data.from_items([{"x": 1}])
    size_blocks(dataset.context)
    assert dataset.context.target_max_block_size == PLAN_BLOCK_BYTES < 128 * 2**20
    assert getattr(dataset.context, ahead) == TASK_BLOCKS_AHEAD > 2
    assert (process.target_max_block_size, getattr(process, ahead)) == before
    small = ray.data.DataContext()
    small.target_max_block_size = 16 * 1024
    size_blocks(small)
    assert small.target_max_block_size == 16 * 1024


def test_the_listing_runs_a_bounded_number_of_images_ahead_of_the_writers(ray_session) -> None:  # type: ignore[no-untyped-def]
    """The lister waits while ``ahead`` images are fed and not yet written, goes on as they
    are written, and a cancel ends a waiting lister."""
    from pipeline.feed import StreamedListing

    written = {"rows": 0}

    def listing(keep: Any) -> Any:
        for _ in range(20):
            keep(pa.table({"uri": [f"u{i}" for i in range(100)]}))
        return "books"

    streamed = StreamedListing(listing, ahead=300)
    streamed.written = lambda: written["rows"]

    def settles_at(queued: int) -> None:
        deadline = time.time() + 30
        while streamed.queued < queued:
            assert time.time() < deadline, streamed.queued
            time.sleep(0.05)
        time.sleep(0.5)
        assert streamed.queued == queued and not streamed.done

    assert streamed.start()
    settles_at(300)
    written["rows"] = 250
    settles_at(600)  # fed 600, written 250: 350 ahead
    streamed.cancel()
    assert streamed.done and not streamed.failed
