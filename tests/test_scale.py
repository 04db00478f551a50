"""At scale: the listing streams into the run, and the driver keeps only the books."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from bench.overhead import Identity
from pipeline.config import EmbedConfig
from pipeline.output import read_embeddings
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
