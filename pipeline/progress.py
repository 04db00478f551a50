"""Progress in images, while Ray Data executes a run.

The model stage reports each batch it embedded to a small counter actor (one fire-and-forget
call per batch); a thread in the driver reads the counter and shows one line: a bar that
redraws itself on a terminal, or a log line every 30 s or 5 % when piped. Ray Data's own
per-operator bars count blocks and files, not images, and are off unless ``-v``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TextIO

ProgressMode = Literal["auto", "bar", "log", "none"]
PROGRESS_MODES: tuple[str, ...] = ("auto", "bar", "log", "none")


class ProgressCounter:
    """A Ray actor (see :func:`counter_actor`): images embedded and failed so far."""

    def __init__(self) -> None:
        self.embedded = 0
        self.failed = 0

    def add(self, embedded: int, failed: int) -> None:
        self.embedded += embedded
        self.failed += failed

    def read(self) -> tuple[int, int]:
        return self.embedded, self.failed


def driver_actor(cls: type, *args: Any) -> Any:
    """An actor that serves the driver (the progress counter, the listing's feed): on the
    driver's own node, so that losing a worker node does not lose it, and without a CPU, so
    that it never waits for one behind the stages."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor: Any = ray.remote(cls).options(num_cpus=0, max_restarts=0, scheduling_strategy=here)
    return actor.remote(*args)


def counter_actor() -> Any:
    return driver_actor(ProgressCounter)


def read_counter(counter: Any) -> tuple[int, int] | None:
    """``(images done, of which failed)`` from the counter actor; ``None`` if it cannot say
    now (a display never fails the run)."""
    import ray

    try:
        embedded, failed = ray.get(counter.read.remote(), timeout=10)
    except (ray.exceptions.RayError, TimeoutError):
        return None
    return int(embedded) + int(failed), int(failed)


def reporting(embedder: type) -> type:
    """The model stage's class, telling ``progress`` (a counter actor) of each batch (but
    not of the rows of ``probes``, :mod:`pipeline.probe`).

    A subclass made here, in the driver, so that the stage itself stays free of Ray.
    """

    class Reporting(embedder):  # type: ignore[valid-type,misc]
        def __init__(self, *, progress: Any, probes: Sequence[Any] = (), **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._progress = progress
            self._probes = probes  # the probe's stored images are not the run's to count

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            from pipeline.probe import probe_rows

            out = super().__call__(batch)
            counted = ~probe_rows(out, self._probes) if self._probes else slice(None)
            # The output's errors: a stage that decodes (--decode-device cuda) adds its own.
            errors = out["error_type"][counted]
            failed = int((errors != "").sum())
            self._progress.add.remote(len(errors) - failed, failed)
            return out

    Reporting.__name__ = Reporting.__qualname__ = embedder.__name__  # Ray's operator names
    return Reporting


def format_seconds(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``.

    Example:
        >>> format_seconds(3725), format_seconds(185), format_seconds(42.4)
        ('1h02m', '3m05s', '42s')
    """
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(done: int, failed: int, total: int | None, seconds: float) -> str:
    """``1,234/5,000 images (24%) · 45.2 images/s · ETA 1m23s · failed 3``; while the input
    is still being listed (``total`` None): ``1,234 images (listing) · 45.2 images/s · …``."""
    rate = done / seconds if seconds > 0 else 0.0
    if total is None:
        return f"{done:,} images (listing) · {rate:.1f} images/s · failed {failed:,}"
    share = f" ({done / total:.0%})" if total else ""
    eta = f" · ETA {format_seconds((total - done) / rate)}" if rate > 0 and total > done else ""
    return f"{done:,}/{total:,} images{share} · {rate:.1f} images/s{eta} · failed {failed:,}"


class ProgressDisplay:
    """Shows the counter's images while a run executes (a context manager).

    Args:
        read: Returns ``(images done, of which failed)``; for a run, :func:`read_counter`.
        total: Images the run has to embed, or what returns them (``None`` until known).
        mode: ``bar`` redraws one line on a terminal; ``log`` prints a line every ``every``
            seconds, or sooner once ``step`` of the total is done (but never within
            ``gap`` seconds of the last line); ``auto`` picks by ``out.isatty()``.
        out: Where to show it (stderr: stdout carries the summary).
    """

    def __init__(
        self,
        read: Callable[[], tuple[int, int] | None],
        *,
        total: int | Callable[[], int | None],
        mode: ProgressMode = "auto",
        out: TextIO | None = None,
        every: float = 30.0,
        step: float = 0.05,
        gap: float = 10.0,
        poll: float = 1.0,
    ) -> None:
        self.read, self.out = read, out or sys.stderr
        self.total_of = total if callable(total) else (lambda: total)
        isatty = getattr(self.out, "isatty", lambda: False)()
        self.mode = ("bar" if isatty else "log") if mode == "auto" else mode
        self.every, self.step, self.gap, self.poll = every, step, gap, poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self.started = time.time()
        self.lines = 0

    def __enter__(self) -> ProgressDisplay:
        if self.mode != "none":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.mode == "bar" and self.lines:
            print(file=self.out)  # leave the bar's last state on its own line

    def _run(self) -> None:
        last_time, last_share = self.started, 0.0
        while not self._stop.wait(self.poll):
            read = self.read()
            if read is None:
                continue
            done, failed = read
            now = time.time()
            total = self.total_of()
            line = progress_line(done, failed, total, now - self.started)
            if self.mode == "bar":
                print(f"\r{line}\033[K", end="", file=self.out, flush=True)
                self.lines = 1
                continue
            share = done / total if total else 0.0 if total is None else 1.0
            # The last step is the summary's to tell.
            since = now - last_time
            if (total is None or done < total) and (
                since >= self.every or (share - last_share >= self.step and since >= self.gap)
            ):
                print(f"embed-images: {line}", file=self.out, flush=True)
                last_time, last_share = now, share
                self.lines += 1
