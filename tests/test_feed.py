"""Stage 1 into Ray: the listing streams into the running plan, a bounded number of images
ahead, and an ``--input-list`` is read by Ray Data, not the driver."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from conftest import zero_byte_images

from bench.overhead import Identity
from pipeline.config import EmbedConfig
from pipeline.read import read_embeddings
from pipeline.run import execute_run, prepare_run


def marking_identity(marker: str) -> type[Identity]:
    """The bench's identity model stage, leaving ``marker`` once it has seen a batch."""

    class Marking(Identity):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            Path(marker).touch()
            return super().__call__(batch)

    return Marking


@pytest.mark.slow
def test_work_starts_while_the_listing_goes_on(tmp_path, ray_session, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pipeline import incremental

    photos, marker = tmp_path / "photos", tmp_path / "model-saw-a-batch"
    zero_byte_images(photos, 600)
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
    zero_byte_images(photos, 300)
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
