"""Progress in images: the counter the model stage feeds, and what the driver shows of it."""

from __future__ import annotations

import io
import sys
import time

import numpy as np
import pytest
from ray import cloudpickle

from pipeline.progress import ProgressDisplay, counter_actor, progress_line, read_counter, reporting

# Ray workers cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_the_line_says_images_rate_eta_and_failures() -> None:
    line = progress_line(1234, 3, 5000, 10.0)
    assert line == "1,234/5,000 images (25%) · 123.4 images/s · ETA 31s · failed 3"


class _Counts:
    """A fake counter: each read advances by one step."""

    def __init__(self, steps: list[tuple[int, int]]) -> None:
        self.steps = steps

    def __call__(self) -> tuple[int, int] | None:
        return self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]


def test_piped_progress_prints_a_line_per_step_but_not_the_last() -> None:
    out = io.StringIO()
    read = _Counts([(0, 0), (10, 0), (11, 0), (50, 1), (100, 2)])
    with ProgressDisplay(read, total=100, mode="log", out=out, step=0.05, gap=0, poll=0.01):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    # 10 and 50 are steps of 5% or more; 11 is not; 100 is the summary's to tell.
    assert [line.split(" images")[0] for line in lines] == [
        "embed-images: 10/100",
        "embed-images: 50/100",
    ], lines


def test_piped_progress_waits_its_gap_and_says_it_is_alive_every_interval() -> None:
    out = io.StringIO()
    with ProgressDisplay(
        _Counts([(1, 0)]), total=100, mode="log", out=out, every=0.05, gap=60, poll=0.01
    ):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all("1/100 images" in line for line in lines), lines


def test_a_terminal_gets_one_redrawn_bar() -> None:
    out = io.StringIO()
    with ProgressDisplay(_Counts([(5, 0), (7, 1)]), total=10, mode="bar", out=out, poll=0.01):
        time.sleep(0.1)
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    assert "7/10 images (70%)" in text and "failed 1" in text


class _Echo:
    """A stand-in model stage: what the pipeline's returns, without the model."""

    def __init__(self, *, scale: int) -> None:
        self.scale = scale

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"] * self.scale, "error_type": batch["error_type"]}


@pytest.mark.slow
def test_the_model_stage_reports_each_batch_to_the_counter(ray_session) -> None:  # type: ignore[no-untyped-def]
    import ray

    counter = counter_actor()
    stage = reporting(_Echo)
    assert stage.__name__ == "_Echo"  # Ray names the operator after the stage
    rows = (
        ray.data.range(10)
        .map(lambda row: {"id": row["id"], "error_type": "empty" if row["id"] < 3 else ""})
        .map_batches(
            stage,
            batch_size=4,
            fn_constructor_kwargs={"scale": 2, "progress": counter},
            compute=ray.data.ActorPoolStrategy(size=1),
        )
        .take_all()
    )
    assert sorted(r["id"] for r in rows) == [2 * i for i in range(10)]
    # The reports are fire-and-forget: they may land just after the last batch.
    deadline = time.time() + 30
    while read_counter(counter) != (10, 3) and time.time() < deadline:
        time.sleep(0.1)
    assert read_counter(counter) == (10, 3)  # done (failed included), failed


def test_failures_the_model_stage_finds_itself_are_reported() -> None:
    """With --decode-device cuda the model stage decodes: its output holds errors its input
    did not, and those are the ones to count."""

    class Decoding:
        def __init__(self, **kwargs: object) -> None:
            pass

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"error_type": np.asarray(["truncated", "", ""], dtype=object)}

    reports: list[tuple[int, int]] = []

    class Counter:
        class add:  # noqa: N801 - an actor method's shape: counter.add.remote(...)
            @staticmethod
            def remote(done: int, failed: int) -> None:
                reports.append((done, failed))

    stage = reporting(Decoding)(progress=Counter())
    stage({"error_type": np.asarray(["", "", ""], dtype=object)})
    assert reports == [(2, 1)]
