"""At scale: the listing streams into the run, and the driver keeps only the books."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from bench.overhead import Identity
from pipeline.config import EmbedConfig
from pipeline.output import read_embeddings, read_manifest
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


ROOT = Path(__file__).resolve().parents[1]


def _rows_once(output: Path, table: str) -> list[str]:
    """The current rows' URIs, each once, and the plain dataset read agrees."""
    uris = read_embeddings(str(output), table=table)["uri"].to_pylist()
    assert len(uris) == len(set(uris))
    plain = pads.dataset(str(output / table), format="parquet", partitioning="hive").to_table()
    assert sorted(plain["uri"].to_pylist()) == sorted(uris)  # no uncommitted or doubled rows
    return uris


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_keeps_them_and_the_rerun_does_the_rest(
    tmp_path, ray_session
) -> None:  # type: ignore[no-untyped-def]
    photos, output = tmp_path / "photos", tmp_path / "out"
    _zero_byte_images(photos, 300)
    options = dict(
        input=str(photos),
        output=str(output),
        weights="random",
        max_error_rate=1.0,
        batch_size=25,
        decode_batch_size=25,
        rows_per_file=25,
        commit_every=50,
    )
    # The driver runs in its own process with its own local Ray; its model stage stalls after
    # eight batches (200 images), so the kill lands between checkpoints with work left.
    script = tmp_path / "driver.py"
    script.write_text(
        "import time, ray\n"
        "from bench.overhead import Identity\n"
        "from pipeline.config import EmbedConfig\n"
        "from pipeline.run import execute_run, prepare_run\n"
        "class Stall(Identity):\n"
        "    calls = 0\n"
        "    def __call__(self, batch):\n"
        "        type(self).calls += 1\n"
        "        if type(self).calls > 8:\n"
        "            time.sleep(600)\n"
        "        return super().__call__(batch)\n"
        f"prepared = prepare_run(EmbedConfig(**{options!r}))\n"
        "ray.init(include_dashboard=False)\n"
        "execute_run(prepared, embedder=Stall)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
    driver = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        checkpoints = 0
        while time.time() < deadline and driver.poll() is None and checkpoints < 3:
            manifest = read_manifest(str(output))
            checkpoints = manifest.runs[-1].checkpoints + 1 if manifest else 0
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, between checkpoints
        driver.wait(timeout=30)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # its local Ray too
        except ProcessLookupError:
            pass
    manifest = read_manifest(str(output))
    assert manifest is not None and manifest.runs[-1].status == "checkpointed"
    kept = _rows_once(output, "errors")  # zero-byte files: an `empty` error row each
    assert len(kept) >= 0.4 * 300, len(kept)  # killed at 50 %: 150 committed

    record = execute_run(prepare_run(EmbedConfig(**options)), embedder=Identity)
    assert record.counts.known_failed == len(kept)  # committed ones are not redone
    assert record.counts.failed == 300 - len(kept)
    assert sorted(_rows_once(output, "errors")) == sorted(str(p) for p in photos.iterdir())
    assert not (output / "_staging").exists()
