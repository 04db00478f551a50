"""``embed-images export``: FAISS and LanceDB indexes that find the near duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.read import read_embeddings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("float16", [False, True])
def test_faiss_export_finds_the_near_duplicates(near_duplicates, tmp_path, float16) -> None:  # type: ignore[no-untyped-def]
    import faiss
    import pyarrow.parquet as pq

    output, groups = near_duplicates
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


def test_lancedb_export_finds_the_near_duplicates(near_duplicates, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import lancedb

    output, groups = near_duplicates
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


@pytest.mark.parametrize("to", ["faiss", "lancedb"])
def test_export_refuses_a_destination_in_a_missing_folder(
    near_duplicates, tmp_path, to, capsys
) -> None:  # type: ignore[no-untyped-def]
    output, _ = near_duplicates
    dest = tmp_path / "no-such-folder" / "index"
    assert main(["export", str(output), "--to", to, str(dest)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-folder does not exist; create it first" in err[0], err
    assert not dest.parent.exists()
