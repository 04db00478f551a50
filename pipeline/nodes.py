"""Nodes lost mid-run, watched from the driver.

Ray retries a lost node's tasks and restarts its actors on the nodes left, and Ray Data waits
for them. A run that lost the only node able to hold a model actor would wait forever, so the
driver watches: it logs each node lost and, once one is, the model stage must finish a batch
every ``--lost-node-wait`` seconds. When it does not, the run drains (:mod:`pipeline.stop`):
what the writers return is committed as checkpoints and the run stops with exit 75.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.stop import Drain

logger = logging.getLogger(__name__)
WATCH_EVERY = 2.0  # seconds between two looks at the cluster's nodes (one GCS call)


def alive_nodes() -> dict[str, str]:
    """The cluster's alive nodes: their ids and addresses."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


@contextlib.contextmanager
def watching_nodes(
    drain: Drain,
    batches: Callable[[], Any],
    *,
    nodes: Callable[[], dict[str, str]] = alive_nodes,
    every: float = WATCH_EVERY,
) -> Iterator[None]:
    """While the plan runs: log each node lost; after a loss, drain when ``batches()`` (what
    the model stage has done, any value that changes as it works) stays the same for
    ``drain.lost_node_wait`` seconds. Without the drain's handlers (a library caller's
    process) it only logs."""
    finished = threading.Event()
    wait = drain.lost_node_wait

    def watch() -> None:
        alive, lost = nodes(), dict[str, str]()
        done, since = batches(), time.time()  # the model stage's last sign of life
        while not finished.wait(every):
            try:
                now = nodes()
            except Exception as exc:  # the GCS did not answer: look again next time
                logger.debug("could not list the cluster's nodes: %s", exc)
                continue
            gone = {node: address for node, address in alive.items() if node not in now}
            for node, address in gone.items():
                logger.warning(
                    "lost Ray node %s (%s): Ray retries its tasks and restarts its actors on "
                    "the nodes left",
                    address,
                    node[:8],
                )
            alive, lost = now, lost | gone
            latest = batches()
            if latest != done or gone:
                done, since = latest, time.time()
            stalled = time.time() - since
            if lost and stalled >= wait and drain.handled and not drain.draining:
                where = ", ".join(sorted(set(lost.values())))
                drain.request(
                    f"lost Ray node {where}, and the model stage has finished no batch for "
                    f"{stalled:.0f} s (--lost-node-wait {wait:g})"
                )
                return

    watcher = threading.Thread(target=watch, name="nodes", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        watcher.join()
