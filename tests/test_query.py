"""``embed-images query``: an image's nearest neighbours, with the model that made the table."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import PipelineError
from pipeline.query import nearest

pytestmark = pytest.mark.slow


def test_query_finds_the_near_duplicates(near_duplicates, capsys) -> None:  # type: ignore[no-untyped-def]
    output, groups = near_duplicates
    for uri, group in groups.items():
        found = nearest(str(output), uri, k=3)
        assert {groups[u] for u in found["uri"].to_pylist()} == {group}, (uri, found.to_pylist())
        assert found["uri"][0].as_py() == uri and found["distance"][0].as_py() < 1e-3
    assert main(["query", str(output), "--image", next(iter(groups)), "--k", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert (
        printed[0].split() == ["rank", "distance", "uri", "width", "height"] and len(printed) == 3
    )


def test_query_refuses_other_weights(near_duplicates) -> None:  # type: ignore[no-untyped-def]
    output, groups = near_duplicates
    with pytest.raises(PipelineError, match="are not the ones that made"):
        nearest(str(output), next(iter(groups)), weights="random", seed=7)
