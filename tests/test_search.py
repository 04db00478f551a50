"""From embeddings to similarity search: query, FAISS and LanceDB exports, README examples."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.corpus import photo_like
from pipeline.cli import main
from pipeline.config import PipelineError
from pipeline.query import nearest
from pipeline.read import iter_embeddings, read_embeddings

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
GROUPS = 4


def _near_duplicates(root: Path) -> dict[str, int]:
    """Four distinct pictures, each with a re-encoded copy and a rescaled copy."""
    root.mkdir(parents=True)
    group_of = {}
    for g in range(GROUPS):
        image = photo_like((320, 240), seed=1000 + g)
        copies = {
            f"g{g}-original.png": (image, "PNG", {}),
            f"g{g}-reencoded.jpg": (image, "JPEG", {"quality": 40}),
            f"g{g}-rescaled.jpg": (
                image.resize((200, 150), Image.Resampling.BILINEAR),
                "JPEG",
                {"quality": 90},
            ),
        }
        for name, (picture, fmt, options) in copies.items():
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt, **options)
            (root / name).write_bytes(buffer.getvalue())
            group_of[str(root / name)] = g
    return group_of


@pytest.fixture(scope="module")
def table(tmp_path_factory, ray_session) -> tuple[Path, dict[str, int]]:  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("search")
    groups = _near_duplicates(base / "photos")
    output = base / "out"
    args = ["run", "--input", str(base / "photos"), "--output", str(output), "--weights", "random"]
    assert main([*args, "--normalize", "--batch-size", "6"]) == 0
    return output, groups


def test_query_finds_the_near_duplicates(table, capsys) -> None:  # type: ignore[no-untyped-def]
    output, groups = table
    for uri, group in groups.items():
        found = nearest(str(output), uri, k=3)
        assert {groups[u] for u in found["uri"].to_pylist()} == {group}, (uri, found.to_pylist())
        assert found["uri"][0].as_py() == uri and found["distance"][0].as_py() < 1e-3
    assert main(["query", str(output), "--image", next(iter(groups)), "--k", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert (
        printed[0].split() == ["rank", "distance", "uri", "width", "height"] and len(printed) == 3
    )


def test_query_refuses_other_weights(table) -> None:  # type: ignore[no-untyped-def]
    output, groups = table
    with pytest.raises(PipelineError, match="are not the ones that made"):
        nearest(str(output), next(iter(groups)), weights="random", seed=7)


def test_normalized_table_cosine_order_is_inner_product_order(table) -> None:  # type: ignore[no-untyped-def]
    output, _ = table
    vectors = np.concatenate(
        [
            b["embedding"].flatten().to_numpy().reshape(b.num_rows, -1)
            for b in iter_embeddings(str(output))
        ]
    )
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    query = vectors[0]
    inner = vectors @ query
    cosine = inner / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    assert list(np.argsort(-inner)) == list(np.argsort(-cosine))


def test_iter_embeddings_streams_the_current_rows(table) -> None:  # type: ignore[no-untyped-def]
    output, groups = table
    batches = list(iter_embeddings(str(output), batch_size=5))
    assert max(b.num_rows for b in batches) <= 5
    assert sorted(u for b in batches for u in b["uri"].to_pylist()) == sorted(groups)


@pytest.mark.parametrize("float16", [False, True])
def test_faiss_export_finds_the_near_duplicates(table, tmp_path, float16) -> None:  # type: ignore[no-untyped-def]
    import faiss
    import pyarrow.parquet as pq

    output, groups = table
    dest = tmp_path / "index.faiss"
    args = ["export", str(output), "--to", "faiss", str(dest), "--normalize", "--batch-size", "5"]
    assert main([*args, *(["--float16"] if float16 else [])]) == 0
    index = faiss.read_index(str(dest))
    ids = pq.read_table(str(dest) + ".ids.parquet").to_pylist()
    assert index.ntotal == len(ids) == len(groups)
    vectors = read_embeddings(str(output), columns=["uri", "embedding"])
    for uri, vector in zip(
        vectors["uri"].to_pylist(), vectors["embedding"].to_numpy(zero_copy_only=False), strict=True
    ):
        _, found = index.search(np.asarray(vector, dtype=np.float32)[None], 3)
        assert {groups[ids[i]["uri"]] for i in found[0]} == {groups[uri]}


def test_lancedb_export_finds_the_near_duplicates(table, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import lancedb

    output, groups = table
    assert (
        main(["export", str(output), "--to", "lancedb", str(tmp_path / "db"), "--batch-size", "5"])
        == 0
    )
    lance_table = lancedb.connect(str(tmp_path / "db")).open_table("embeddings")
    assert lance_table.count_rows() == len(groups)
    vectors = read_embeddings(str(output), columns=["uri", "embedding"])
    for uri, vector in zip(
        vectors["uri"].to_pylist(), vectors["embedding"].to_numpy(zero_copy_only=False), strict=True
    ):
        hits = lance_table.search(np.asarray(vector, dtype=np.float32)).limit(3).to_list()
        assert {groups[h["uri"]] for h in hits} == {groups[uri]}
        assert {"original_width", "original_height"} <= set(hits[0])


@pytest.fixture(scope="module")
def changed(tmp_path_factory, ray_session) -> Path:  # type: ignore[no-untyped-def]
    """An output whose folders hold rows that are no longer current: one image changed and one
    deleted between two runs; vectors not normalized."""
    base = tmp_path_factory.mktemp("changed")
    photos, output = base / "photos", base / "out"
    _near_duplicates(photos)
    args = ["run", "--input", str(photos), "--output", str(output), "--weights", "random"]
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


@pytest.mark.parametrize("to", ["faiss", "lancedb"])
def test_export_refuses_a_destination_in_a_missing_folder(table, tmp_path, to, capsys) -> None:  # type: ignore[no-untyped-def]
    output, _ = table
    dest = tmp_path / "no-such-folder" / "index"
    assert main(["export", str(output), "--to", to, str(dest)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-folder does not exist; create it first" in err[0], err
    assert not dest.parent.exists()
