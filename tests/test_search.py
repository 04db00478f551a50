"""The search and vector-database recipes of docs/search.md, run as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import near_duplicate_photos, run_args

from bench.corpus import photo_like
from pipeline.cli import main
from pipeline.read import read_embeddings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def changed(tmp_path_factory, ray_session) -> Path:  # type: ignore[no-untyped-def]
    """An output whose folders hold rows that are no longer current: one image changed and one
    deleted between two runs; vectors not normalized."""
    base = tmp_path_factory.mktemp("changed")
    photos, output = base / "photos", base / "out"
    near_duplicate_photos(photos)
    args = run_args(photos, output)
    assert main(args) == 0
    photo_like((320, 240), seed=77).save(photos / "g0-original.png")  # another picture
    (photos / "g3-rescaled.jpg").unlink()
    assert main(args) == 0
    return output


RECIPES = ("faiss_export", "faiss", "lancedb", "duckdb")


def _keys(table: Any) -> list[tuple[str, str]]:
    return sorted(zip(table["uri"].to_pylist(), table["run_id"].to_pylist(), strict=True))


@pytest.mark.parametrize("name", RECIPES)
def test_each_search_recipe_reads_current_rows_and_ranks_the_query_first(
    changed, tmp_path, monkeypatch, doc_examples, name
) -> None:  # type: ignore[no-untyped-def]
    """The recipes of docs/search.md, as written (issue 24: the plain folder read brought deleted
    and changed images back, and raw inner products of un-normalized vectors did not rank an
    image first against itself)."""
    current = read_embeddings(str(changed), columns=["uri", "run_id"])
    current_keys = _keys(current)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").symlink_to(changed)
    if name == "faiss_export":  # the page's command, before its code
        assert main(["export", "out", "--to", "faiss", "out.faiss", "--normalize"]) == 0
    scope: dict[str, object] = {}
    exec(compile(doc_examples[name], f"docs/search.md:{name}", "exec"), scope)  # noqa: S102
    neighbours = [str(u) for u in scope["neighbours"]]  # type: ignore[attr-defined]
    assert neighbours[0] == scope["query_uri"], neighbours  # an image is nearest to itself
    assert set(neighbours) <= {u for u, _ in current_keys}  # never a deleted image
    if "current" in scope:
        assert _keys(scope["current"]) == current_keys  # the new row of the changed image
