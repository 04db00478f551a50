"""Reading an output: the current rows, streamed, and normalized vectors where asked for."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.read import iter_embeddings

pytestmark = pytest.mark.slow


def test_normalized_table_cosine_order_is_inner_product_order(near_duplicates) -> None:  # type: ignore[no-untyped-def]
    output, _ = near_duplicates
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


def test_iter_embeddings_streams_the_current_rows(near_duplicates) -> None:  # type: ignore[no-untyped-def]
    output, groups = near_duplicates
    batches = list(iter_embeddings(str(output), batch_size=5))
    assert max(b.num_rows for b in batches) <= 5
    assert sorted(u for b in batches for u in b["uri"].to_pylist()) == sorted(groups)
