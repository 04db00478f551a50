"""Stop signals: Ctrl-C stops a run at once; SIGTERM (a spot notice, a Kubernetes pod stop)
drains it first.

A drain stops the feed of new images, commits each writer's files as they come in (a
checkpoint each) for ``--drain-seconds``, and then stops: whatever was written before the
signal, and what the writers finish in the drain, stays committed; the rest is left to the
next run. A second signal stops at once. The handlers only set flags and raise: the commits
happen in the driver's loop (:meth:`pipeline.sink.RunSink.consume`), never inside a handler,
and a stop that arrives during a commit is raised once the commit is done. A run that stalls
after losing nodes drains the same way (:mod:`pipeline.nodes`).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

from pipeline.config import EXIT_STALLED


class Stopped(BaseException):
    """Ctrl-C or SIGTERM: a ``BaseException``, so that no ``except Exception`` swallows it.

    Args:
        signum: The signal that asked for the stop.
        drained: Whether the run drained first (the writers' files that came in are kept).
        reason: Why the run drained, when no signal asked (:mod:`pipeline.nodes`).
    """

    def __init__(self, signum: int, *, drained: bool = False, reason: str | None = None) -> None:
        super().__init__(reason or signal.Signals(signum).name)
        self.signum = signum
        self.drained = drained
        self.reason = reason

    @property
    def exit_status(self) -> int:
        if self.reason is not None:
            return EXIT_STALLED
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class Drain:
    """What the handlers and the driver's loop share while a run drains (set in a handler,
    read by the loop and by the thread that stops the feed)."""

    def __init__(self, seconds: float, lost_node_wait: float = math.inf) -> None:
        self.seconds = seconds
        # After a lost node, drain when the model stage does nothing this long
        # (pipeline.nodes; --lost-node-wait, given by the entry points; default: never).
        self.lost_node_wait = lost_node_wait
        self.since: float | None = None  # when SIGTERM asked for the drain
        self.reason: str | None = None  # why, when no signal asked (a stall)
        self.requested = threading.Event()  # the feed's stopper waits on it
        self.committing = False  # a commit is under way: a stop waits for its end
        self.deferred: Stopped | None = None  # a stop that came during a commit
        self.handled = False  # catch_stop_signals installed the handlers that end a drain

    @property
    def draining(self) -> bool:
        return self.since is not None

    def request(self, reason: str | None = None) -> None:
        """Drain (a SIGTERM; or ``reason``, from any thread): stop the feed, keep what the
        writers finish, and stop ``seconds`` from now (the timer's SIGALRM)."""
        self.reason = reason
        self.since = time.time()
        self.requested.set()
        signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 0.01))

    def stopped(self) -> Stopped:
        """The stop that ends this drain."""
        return Stopped(signal.SIGTERM, drained=True, reason=self.reason)

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
    if drain is None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise)
        return

    def handle(signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM and not drain.draining and drain.seconds > 0:
            drain.request()
            return
        ended = signum == signal.SIGALRM  # the drain's time is up
        stop = drain.stopped() if ended else Stopped(signum)
        if drain.committing:
            drain.deferred = drain.deferred or stop
            return
        raise stop

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(signum, handle)
    drain.handled = True


def end_drain(drain: Drain | None) -> None:
    """The run is over: no drain's end may fire after it."""
    if drain is not None and drain.draining:
        signal.setitimer(signal.ITIMER_REAL, 0)
