"""Faults: a killed driver, a crash inside the commit, a model actor that dies mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from conftest import command_lines, kill_stalled_driver, run_args
from ray import cloudpickle

from bench.drain import staged_rows
from pipeline.cli import main
from pipeline.config import EmbedConfig
from pipeline.embed import ResNet50Embedder
from pipeline.read import read_embeddings, read_manifest
from pipeline.run import execute_run, prepare_run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# Ray workers cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _photos(root: Path, make_image, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).write_bytes(make_image((40 + i, 30), seed=100 + i))


def _check_each_once(output: Path, photos: Path, names: list[str]) -> dict[str, str]:
    table = read_embeddings(str(output))
    uris = table["uri"].to_pylist()
    assert sorted(uris) == sorted(str(photos / n) for n in names)
    plain = pads.dataset(
        str(output / "embeddings"), format="parquet", partitioning="hive"
    ).to_table()
    assert sorted(plain["uri"].to_pylist()) == sorted(uris)  # no uncommitted or doubled rows
    return dict(zip(uris, [str(r) for r in table["run_id"].to_pylist()], strict=True))


def test_driver_killed_mid_write_then_rerun_finishes_exactly_once(
    tmp_path, make_image, ray_session
) -> None:  # type: ignore[no-untyped-def]
    photos, output = tmp_path / "photos", tmp_path / "out"
    first = [f"a{i}.jpg" for i in range(3)]
    _photos(photos, make_image, first)
    args = [
        "--input",
        str(photos),
        "--output",
        str(output),
        "--weights",
        "random",
        "--batch-size",
        "2",
    ]
    assert main(["run", *args]) == 0
    committed = _check_each_once(output, photos, first)

    more = [f"b{i:02d}.jpg" for i in range(12)]
    _photos(photos, make_image, more)
    staging = output / "_staging"
    # The model stage stalls after four batches: the kill lands mid-run, with files already
    # in staging.
    kill_stalled_driver(
        tmp_path,
        dict(
            input=str(photos),
            output=str(output),
            weights="random",
            batch_size=2,
            decode_batch_size=2,
            rows_per_file=2,
        ),
        stage="pipeline.embed:ResNet50Embedder",
        stall_after=4,
        ready=lambda: any(staging.glob("*/embeddings/*.parquet")),
    )
    # The killed run committed nothing: readers see exactly the first run.
    assert _check_each_once(output, photos, first) == committed

    # Retention 0: the killed run's staging goes at once (by default it waits an hour).
    assert main(["run", *args, "--cleanup-retention", "0"]) == 0
    final = _check_each_once(output, photos, first + more)
    assert {u: final[u] for u in committed} == committed  # earlier rows untouched
    assert not staging.exists()


def test_crash_between_moving_files_and_the_manifest(
    tmp_path, make_image, ray_session, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    photos, output = tmp_path / "photos", tmp_path / "out"
    names = ["x0.jpg", "x1.jpg"]
    _photos(photos, make_image, names)
    config = EmbedConfig(input=str(photos), output=str(output), weights="random", batch_size=2)

    def power_cut(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("power cut")

    monkeypatch.setattr("pipeline.commit.write_manifest", power_cut)
    with pytest.raises(OSError, match="power cut"):
        execute_run(prepare_run(config))
    assert read_manifest(str(output)) is None  # nothing committed
    assert list((output / "embeddings").glob("run_id=*/*.parquet"))  # though files were moved
    monkeypatch.undo()

    # Retention 0: the moved, never-committed files go at once (by default after an hour;
    # until then readers through the manifest see each image once, the plain read may not).
    args = run_args(photos, output)
    assert main([*args, "--cleanup-retention", "0"]) == 0
    _check_each_once(output, photos, names)


def crash_once_embedder(marker: str) -> type[ResNet50Embedder]:
    """A model stage whose first actor dies (os._exit) on its second batch."""

    class CrashOnce(ResNet50Embedder):
        calls = 0

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            type(self).calls += 1
            if type(self).calls == 2 and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    return CrashOnce


def test_model_actor_dying_mid_run_is_restarted_and_nothing_doubles(
    tmp_path, make_image, ray_session
) -> None:  # type: ignore[no-untyped-def]
    photos, output = tmp_path / "photos", tmp_path / "out"
    names = [f"c{i}.jpg" for i in range(8)]
    _photos(photos, make_image, names)
    marker = tmp_path / "crashed"
    config = EmbedConfig(
        input=str(photos), output=str(output), weights="random", batch_size=2, decode_batch_size=2
    )
    summary = execute_run(prepare_run(config), embedder=crash_once_embedder(str(marker)))
    assert marker.exists()  # an actor did die
    assert summary.counts.embedded == len(names) and summary.counts.failed == 0
    _check_each_once(output, photos, names)


def _stderr_filters() -> list[int]:
    """Live stderr filters (``python pipeline/logs.py``) of this checkout's runs."""
    script = str(ROOT / "pipeline" / "logs.py")
    return [pid for pid, line in command_lines() if script in line]


def _session_processes(sid: int) -> list[int]:
    """Live processes of a session (a driver started with start_new_session, and its Ray)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return found


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_mid_run_says_one_line_and_leaves_nothing_behind(
    tmp_path, make_image, signum, status
) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C stops at once, committing nothing; SIGTERM drains (here for half a second)
    and keeps what was written (tests/test_drain.py has the drain's cases)."""
    photos, output = tmp_path / "photos", tmp_path / "out"
    _photos(photos, make_image, [f"s{i:02d}.jpg" for i in range(24)])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--input", str(photos), "--output"]
        + [str(output), "--weights", "random", "--batch-size", "2", "--decode-batch-size", "2"]
        + ["--rows-per-file", "2", "--drain-seconds", "0.5"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            if any((output / "_staging").glob("*/embeddings/*.parquet")):
                break
            time.sleep(0.2)
        if driver.poll() is not None:
            _, err = driver.communicate()
            pytest.fail(f"the run ended ({driver.returncode}) before it could be stopped: {err}")
        assert _stderr_filters()
        written = staged_rows(str(output))
        driver.send_signal(signum)
        _, err = driver.communicate(timeout=120)
        assert driver.returncode == status, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"embed-images: stopped by {signal.Signals(signum).name} after")
        assert "run the same command again" in last, last
        assert not (output / "_staging").exists()  # this run's staging is gone
        manifest = read_manifest(str(output))
        if signum == signal.SIGINT:
            assert "nothing of run" in last, last
            assert manifest is None  # nothing was committed
        else:
            assert "and a drain of 0.5 s" in last, last
            assert manifest is not None and manifest.runs[-1].status == "checkpointed"
            kept = manifest.runs[-1].counts.embedded + manifest.runs[-1].counts.failed
            assert f"kept {kept} images in" in last, last
            assert written <= kept < 24  # every image written before the signal is kept
        deadline = time.time() + 30  # Ray's processes leave with their driver
        while _session_processes(driver.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _session_processes(driver.pid)
        # The stderr filter (a session of its own, spared the terminal's signal) ends too.
        assert not _stderr_filters()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
