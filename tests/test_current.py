"""Which committed rows are current: the latest row per URI in commit order, deletions,
and the hash index that finds rows by key."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.current import resolve_current


def _narrow(rows: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"uri": [u for u, _ in rows], "run_id": [r for _, r in rows]})


def test_latest_row_per_uri_wins_and_deletions_drop() -> None:
    embeddings = _narrow([("a", "r1"), ("b", "r1"), ("a", "r2"), ("c", "r2")])
    errors = _narrow([("b", "r3"), ("d", "r1")])
    deletions = _narrow([("c", "r3"), ("d", "r0")])  # d's deletion predates its row: d stays
    emb, err = resolve_current(embeddings, errors, deletions)
    assert sorted(zip(emb["uri"].to_pylist(), emb["run_id"].to_pylist(), strict=True)) == [
        ("a", "r2")
    ]
    assert sorted(zip(err["uri"].to_pylist(), err["run_id"].to_pylist(), strict=True)) == [
        ("b", "r3"),
        ("d", "r1"),
    ]


def _random_runs(seed: int) -> tuple[pa.Table, pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    uris = [f"s3://b/{i}.jpg" for i in rng.integers(0, 300, 1000)]
    runs = [f"2026010{d}T000000Z-x" for d in rng.integers(1, 9, 1000)]
    emb = pa.table({"uri": uris[:700], "run_id": runs[:700]})
    err = pa.table({"uri": uris[700:], "run_id": runs[700:]})
    gone_at = rng.choice(1000, 80, replace=False)
    gone = pa.table(
        {
            "uri": [uris[i] for i in gone_at],
            "run_id": [f"2026010{d}T000000Z-x" for d in rng.integers(1, 9, 80)],
        }
    )
    # Many small chunks, as tables read from many files are.
    return (
        pa.Table.from_batches(emb.to_batches(max_chunksize=64)),
        pa.Table.from_batches(err.to_batches(max_chunksize=64)),
        gone,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resolving_by_hash_equals_the_exact_sort(seed: int) -> None:
    from pipeline.current import _rows_by_sort, resolve_rows

    tables = _random_runs(seed)
    runs = sorted({*tables[0]["run_id"].to_pylist(), *tables[1]["run_id"].to_pylist()})
    runs = sorted({*runs, *tables[2]["run_id"].to_pylist()})
    by_hash = resolve_rows(*tables)
    by_sort = _rows_by_sort(*tables, pa.array(runs, pa.large_string()))
    for ours, exact in zip(by_hash, by_sort, strict=True):
        assert ours.tolist() == exact.tolist()
    emb, err = resolve_current(*tables)
    uris = emb["uri"].to_pylist() + err["uri"].to_pylist()
    assert len(set(uris)) == len(uris)  # each URI once


def test_hash_collisions_never_make_an_absent_key_present(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pipeline import current
    from pipeline.current import KeyIndex, take_rows

    # Every key hashes alike: each lookup is a collision, which the keys must settle.
    monkeypatch.setattr(
        current, "hash_keys", lambda table, columns: np.zeros(table.num_rows, np.uint64)
    )
    index = KeyIndex(pa.table({"uri": ["a", "b", "c"]}), ["uri"])
    found = index.find(pa.table({"uri": ["a", "b", "zz"]}))
    assert found[2] == -1 and found[1] == -1  # absent stays absent; "b" degrades to absent
    assert found[0] == 0
    # resolve_current falls back to the exact sort: the same rows as without collisions.
    tables = _random_runs(3)
    collided = resolve_current(*tables)
    monkeypatch.undo()
    for ours, exact in zip(collided, resolve_current(*tables), strict=True):
        assert ours.to_pydict() == exact.to_pydict()
    values = tables[0]["uri"]
    rows = np.array([5, 600, 0, 64, 63, 5])
    assert take_rows(values, rows).to_pylist() == values.take(rows).to_pylist()
