"""The run's books and commits: checkpoints kept by a kill, and the rerun does the rest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pytest
from conftest import kill_stalled_driver, zero_byte_images

from bench.overhead import Identity
from pipeline.config import EmbedConfig
from pipeline.read import read_embeddings, read_manifest
from pipeline.run import execute_run, prepare_run


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
    zero_byte_images(photos, 300)
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


@pytest.mark.slow
def test_checkpoints_commit_to_s3_and_a_killed_run_resumes(
    tmp_path, ray_session, s3_bucket, s3_endpoint
) -> None:  # type: ignore[no-untyped-def]
    """On S3 a checkpoint's manifest PUT is conditional on the ETag the run's previous PUT
    returned: a run of several checkpoints commits each, and one that dies mid-way resumes."""
    s3, bucket = s3_bucket
    photos, output = tmp_path / "photos", f"s3://{bucket}/out"
    zero_byte_images(photos, 120)
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
