"""The seeded chaos of ``bench.chaos`` in the suite: a fixed seed, a few rounds on each store.

Each round plays runs, races, compactions, ``--full`` runs with other weights and SIGKILLs at
random moments against one output, then checks the output's invariants (``bench.chaos``'s
docstring lists them). ``python -m bench.chaos --rounds 200`` plays it longer.
"""

from __future__ import annotations

import pytest

from bench.chaos import play

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_seeded_chaos_keeps_every_invariant_on_local_disk_and_s3(tmp_path, aws_credentials) -> None:  # type: ignore[no-untyped-def]
    figures = play(tmp_path, rounds=8, seed=20261205)
    for store in ("local", "s3"):
        tally = figures[store]
        assert tally["rounds"] == 4, figures
        # Every check ran: after the scenario and after the finishing run, each round.
        assert tally["checks"] >= 4 * 2 * 3, figures
        assert tally["failed_other"] == 0, figures
    # The fixed seed plays kills and races: the invariants were tested under them.
    assert sum(figures[s]["kills"] for s in ("local", "s3")) >= 1, figures
    assert sum(figures[s]["races"] for s in ("local", "s3")) >= 1, figures
