"""The driver's watch on lost nodes (pipeline.nodes), on a made-up cluster: it drains a run
only after a node is lost and the model stage then stalls for --lost-node-wait."""

from __future__ import annotations

import time

from pipeline.nodes import watching_nodes
from pipeline.stop import Drain


class Recorded(Drain):
    """A drain whose request is only written down (no timer, no signal)."""

    def __init__(self, wait: float, handled: bool = True) -> None:
        super().__init__(25, lost_node_wait=wait)
        self.handled = handled
        self.reasons: list[str | None] = []

    def request(self, reason: str | None = None) -> None:
        self.reasons.append(reason)
        self.since = time.time()


def test_no_node_lost_no_drain_however_long_the_model_stage_takes() -> None:
    drain, nodes = Recorded(0.1), {"a": "10.0.0.1", "b": "10.0.0.2"}
    with watching_nodes(drain, lambda: 0, nodes=lambda: nodes, every=0.02):
        time.sleep(0.5)
    assert drain.reasons == []


def test_a_stall_after_a_lost_node_drains_once_with_the_node_named() -> None:
    drain, cluster = Recorded(0.3), [{"a": "10.0.0.1", "b": "10.0.0.2"}]
    with watching_nodes(drain, lambda: 0, nodes=lambda: cluster[0], every=0.02):
        time.sleep(0.1)
        cluster[0] = {"a": "10.0.0.1"}
        time.sleep(0.2)
        assert drain.reasons == []  # not yet --lost-node-wait
        time.sleep(0.4)
    (reason,) = drain.reasons
    assert reason is not None and reason.startswith("lost Ray node 10.0.0.2, and the model stage")
    assert "(--lost-node-wait 0.3)" in reason


def test_batches_after_a_lost_node_keep_the_run_going() -> None:
    drain, cluster, batches = Recorded(0.3), [{"a": "10.0.0.1", "b": "10.0.0.2"}], [0]
    with watching_nodes(drain, lambda: batches[0], nodes=lambda: cluster[0], every=0.02):
        cluster[0] = {"a": "10.0.0.1"}
        for _ in range(8):  # a batch every 0.1 s: the restarted actor works
            time.sleep(0.1)
            batches[0] += 1
    assert drain.reasons == []


def test_without_the_drains_handlers_it_only_logs(caplog) -> None:  # type: ignore[no-untyped-def]
    """A library caller's process (no handler would end the drain): the loss is logged, the
    run left to Ray."""
    drain, cluster = Recorded(0.1, handled=False), [{"a": "10.0.0.1", "b": "10.0.0.2"}]
    with watching_nodes(drain, lambda: 0, nodes=lambda: cluster[0], every=0.02):
        cluster[0] = {"a": "10.0.0.1"}
        time.sleep(0.4)
    assert drain.reasons == []
    assert "lost Ray node 10.0.0.2 (b)" in caplog.text
