"""Stop signals: Ctrl-C stops a run at once; SIGTERM (a spot notice, a Kubernetes pod stop)
drains it first.

A drain stops the feed of new images, commits each writer's files as they come in (a
checkpoint each) for ``--drain-seconds``, and then stops: whatever was written before the
signal, and what the writers finish in the drain, stays committed; the rest is left to the
next run. A second signal stops at once. The handlers only set flags and raise: the commits
happen in the driver's loop (:meth:`pipeline.sink.RunSink.consume`), never inside a handler,
and a stop that arrives during a commit is raised once the commit is done.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any


class Stopped(BaseException):
    """Ctrl-C or SIGTERM: a ``BaseException``, so that no ``except Exception`` swallows it.

    Args:
        signum: The signal that asked for the stop.
        drained: Whether the run drained first (the writers' files that came in are kept).
    """

    def __init__(self, signum: int, *, drained: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.drained = drained

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class Drain:
    """What the handlers and the driver's loop share while a run drains (set in a handler,
    read by the loop and by the thread that stops the feed)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.since: float | None = None  # when SIGTERM asked for the drain
        self.requested = threading.Event()  # the feed's stopper waits on it
        self.committing = False  # a commit is under way: a stop waits for its end
        self.deferred: Stopped | None = None  # a stop that came during a commit

    @property
    def draining(self) -> bool:
        return self.since is not None

    def stop_after_commit(self) -> None:
        """After each commit: raise a stop that waited for it."""
        if self.deferred is not None:
            stop, self.deferred = self.deferred, None
            raise stop


def _raise(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def catch_stop_signals(drain: Drain | None = None) -> None:
    """Ctrl-C and SIGTERM raise :class:`Stopped` in the main thread; with ``drain`` (a run
    under way), SIGTERM drains for ``drain.seconds`` first (none: at once)."""
    if drain is None or drain.seconds <= 0:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise)
        return

    def handle(signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM and not drain.draining:
            drain.since = time.time()
            drain.requested.set()
            signal.setitimer(signal.ITIMER_REAL, drain.seconds)  # the drain's end: SIGALRM
            return
        ended = signum == signal.SIGALRM  # the drain's time is up
        stop = Stopped(signal.SIGTERM if ended else signum, drained=ended)
        if drain.committing:
            drain.deferred = drain.deferred or stop
            return
        raise stop

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(signum, handle)


def end_drain(drain: Drain | None) -> None:
    """The run is over: no drain's end may fire after it."""
    if drain is not None and drain.draining:
        signal.setitimer(signal.ITIMER_REAL, 0)
