"""SIGTERM drains a run (pipeline.stop): no new images are fed, what the writers finish is
committed as checkpoints, and the next run embeds the rest, each image once.

The runs are in this process, on the session's Ray, with a slow model stage (zero vectors, a
sleep per batch) so that a signal lands mid-run; the signal is this process's own SIGTERM,
sent from a thread once the writers have staged their first file.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from ray import cloudpickle

from bench.drain import staged_rows
from bench.overhead import Identity
from pipeline.config import EmbedConfig
from pipeline.read import read_embeddings, read_manifest
from pipeline.run import execute_run, prepare_run, probe_run
from pipeline.stop import Drain, Stopped, catch_stop_signals, end_drain

IMAGES = 40
# The model stage's class below runs in Ray's workers, which cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Slow(Identity):
    """Zero vectors, a quarter second per batch."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.25)
        return super().__call__(batch)


def small_run(tmp_path: Path, make_image: Any, output: str = "", **knobs: Any) -> EmbedConfig:
    """``IMAGES`` small photos, and a run of them in batches, tasks and files of two images
    into ``output`` (default: a local folder)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(IMAGES):
        (photos / f"d{i:02d}.png").write_bytes(make_image((20 + i, 16), fmt="PNG", seed=i))
    return EmbedConfig(
        input=str(photos),
        output=output or str(tmp_path / "out"),
        weights="random",
        batch_size=2,
        decode_batch_size=2,
        rows_per_file=2,
        **knobs,
    )


@pytest.fixture
def own_signals():  # type: ignore[no-untyped-def]
    """The test installs the run's handlers; pytest's and Ray's come back after it."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def signal_once_staged(
    output: str,
    options: dict[str, str],
    signals: int = 1,
    gap: float = 0.0,
) -> dict[str, Any]:
    """Send this process SIGTERM (``signals`` times, ``gap`` apart) once a file is staged;
    what was staged then, and when."""
    sent: dict[str, Any] = {}

    def watch() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not staged_rows(output, options):
            time.sleep(0.05)
        sent["staged"] = staged_rows(output, options)
        sent["at"] = time.time()
        for i in range(signals):
            if i:
                time.sleep(gap)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    return sent


def drained_run(config: EmbedConfig, drain: Drain, **kwargs: Any) -> Stopped:
    catch_stop_signals(drain)
    try:
        with pytest.raises(Stopped) as stopped:
            execute_run(prepare_run(config), embedder=Slow, drain=drain, **kwargs)
    finally:
        end_drain(drain)
    return stopped.value


def kept(output: str, options: dict[str, str]) -> tuple[str, int]:
    """The last run's status, and its images committed (embedded or failed)."""
    manifest = read_manifest(output, storage_options=options)
    assert manifest is not None, "the drain committed nothing"
    record = manifest.runs[-1]
    return record.status, record.counts.embedded + record.counts.failed


def rerun_finishes_each_once(config: EmbedConfig, options: dict[str, str]) -> None:
    record = execute_run(prepare_run(config), embedder=Identity)
    assert record.status == "committed"
    uris = read_embeddings(config.output, storage_options=options)["uri"].to_pylist()
    assert len(uris) == IMAGES and len(set(uris)) == IMAGES


def test_sigterm_stops_the_feed_and_keeps_every_written_image(
    output_uri, tmp_path, make_image, ray_session, own_signals, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The listing (chunks of 8, each its own block) is still going when SIGTERM comes: the
    drain stops it, the images fed are written and committed, the rest are never fed, and
    the run stops long before its drain's time is up."""
    from pipeline import incremental
    from pipeline.feed import StreamedListing

    output, options = output_uri
    real, real_stop = incremental.list_images, StreamedListing.stop_feeding
    stopped = threading.Event()

    def slow_listing(*args: Any, **kwargs: Any) -> Iterator[pa.Table]:
        for n, chunk in enumerate(real(*args, **kwargs)):
            if n == 2:  # a slow LIST: the rest comes once the drain has stopped the feed
                assert stopped.wait(120), "the feed was not stopped"
            yield chunk

    def stop_feeding(self: StreamedListing) -> None:
        real_stop(self)
        stopped.set()

    monkeypatch.setattr(incremental, "list_images", slow_listing)
    monkeypatch.setattr(StreamedListing, "stop_feeding", stop_feeding)
    monkeypatch.setattr(incremental, "LISTING_BLOCK_ROWS", 8)
    import ray

    # Ray Data hands a read task's output on by the block: here a block is a chunk.
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "target_max_block_size", 256)
    config = small_run(
        tmp_path,
        make_image,
        output,
        drain_seconds=60,
        storage_options=options,
        # While the listing goes on, Ray Data keeps a share of 2 CPUs for its earlier
        # stages: small tasks fit in what is left to the writers.
        decode_cpus=0.25,
        write_cpus=0.25,
    )
    sent = signal_once_staged(output, options)
    stop = drained_run(config, Drain(config.drain_seconds))
    assert stop.drained and stop.exit_status == 143
    assert time.time() - sent["at"] < 30  # ended by the feed, not by the drain's 60 s
    status, images = kept(output, options)
    assert status == "checkpointed"
    assert 0 < sent["staged"] <= images <= 16  # every written image kept; the rest not fed
    # Every file the writers staged is committed (on S3 staging keeps the sources of the
    # copies until the run's clean-up).
    fs, root = fsspec.core.url_to_fs(output, **options)
    fs.invalidate_cache()
    staged = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/_staging/*/*/*.parquet")}
    record = read_manifest(output, storage_options=options).runs[-1]  # type: ignore[union-attr]
    committed = {p.rsplit("/", 1)[-1] for paths in record.files.values() for p in paths}
    assert staged <= committed
    monkeypatch.undo()
    rerun_finishes_each_once(config, options)


def test_a_drain_that_runs_out_of_time_keeps_what_came_in(
    tmp_path, make_image, ray_session, own_signals
) -> None:  # type: ignore[no-untyped-def]
    """A listing held in the driver is not cut short: the drain's end (SIGALRM) stops the
    run, and what the writers returned by then is committed."""
    config = small_run(tmp_path, make_image, drain_seconds=1)
    output = config.output
    run = prepare_run(config)
    listing = probe_run(run)
    assert listing is not None  # held in the driver
    sent = signal_once_staged(output, {})
    stop = drained_run(config, Drain(config.drain_seconds), listing=listing)
    assert stop.drained
    status, images = kept(output, {})
    assert status == "checkpointed" and sent["staged"] <= images < IMAGES
    rerun_finishes_each_once(config, {})


def test_a_second_sigterm_stops_at_once(tmp_path, make_image, ray_session, own_signals) -> None:  # type: ignore[no-untyped-def]
    config = small_run(tmp_path, make_image, drain_seconds=60)
    output = config.output
    sent = signal_once_staged(output, {}, signals=2, gap=0.5)
    stop = drained_run(config, Drain(config.drain_seconds))
    assert not stop.drained and stop.exit_status == 143
    assert time.time() - sent["at"] < 10
    rerun_finishes_each_once(config, {})


def test_drain_seconds_0_stops_at_once(own_signals) -> None:  # type: ignore[no-untyped-def]
    catch_stop_signals(Drain(0))
    with pytest.raises(Stopped) as stopped:
        signal.raise_signal(signal.SIGTERM)
    assert not stopped.value.drained and stopped.value.exit_status == 143


def test_drain_seconds_is_checked() -> None:
    with pytest.raises(ValueError, match="--drain-seconds -1: must be >= 0"):
        EmbedConfig(input="a", output="b", drain_seconds=-1)


def test_a_stop_during_a_commit_waits_for_its_end(own_signals) -> None:  # type: ignore[no-untyped-def]
    """A handler never raises inside a commit: the stop is raised once it is done."""
    drain = Drain(0.01)
    catch_stop_signals(drain)
    signal.raise_signal(signal.SIGTERM)  # starts the drain: no stop yet
    assert drain.draining and drain.requested.is_set()
    drain.committing = True
    time.sleep(0.1)  # the drain's end (SIGALRM) comes during the "commit"
    assert isinstance(drain.deferred, Stopped) and drain.deferred.drained
    drain.committing = False
    with pytest.raises(Stopped):
        drain.stop_after_commit()
