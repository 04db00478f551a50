"""After the tables: which current images share their bytes (``content_sha256``), and which
are near-duplicates by the cosine similarity of their vectors (FAISS, as ``export`` uses it).

Each group is one JSON line: ``{"kind": "exact", "content_sha256": HEX, "uris": [...]}`` or
``{"kind": "near", "min_similarity": T, "uris": [...]}``; URIs sorted, groups largest first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.embed import EMBEDDING_DIM
from pipeline.read import iter_embeddings, read_embeddings
from pipeline.reuse import CONTENT_COLUMN

# Vectors a near-duplicate search compares at once, and the IVF's training sample.
NEAR_BATCH = 4096
NEAR_TRAIN = 65_536


def exact_groups(
    output: str, *, storage_options: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Groups of current images with the same bytes (rows written before the column existed
    have no digest, and are in no group)."""
    table = read_embeddings(
        output, storage_options=storage_options, columns=["uri", CONTENT_COLUMN]
    )
    table = table.filter(pc.is_valid(table[CONTENT_COLUMN]))
    keyed = pa.table({"digest": table[CONTENT_COLUMN].cast(pa.binary()), "uri": table["uri"]})
    groups = keyed.group_by("digest").aggregate([("uri", "list")])
    groups = groups.filter(pc.greater(pc.list_value_length(groups["uri_list"]), 1))
    found = [
        {"kind": "exact", "content_sha256": digest.hex(), "uris": sorted(uris)}
        for digest, uris in zip(
            groups["digest"].to_pylist(), groups["uri_list"].to_pylist(), strict=True
        )
    ]
    yield from sorted(found, key=lambda g: (-len(g["uris"]), g["uris"][0]))


def near_groups(
    output: str,
    threshold: float,
    *,
    storage_options: Mapping[str, Any] | None = None,
    nprobe: int = 4,
) -> Iterator[dict[str, Any]]:
    """Groups of current images linked by a cosine similarity of at least ``threshold``
    (connected components: a ~ b and b ~ c put a, b and c in one group).

    The vectors are L2-normalized and held as float16 (2 bytes a value, 4 KiB an image).
    Up to ``NEAR_TRAIN`` images are compared exactly (a flat float32 index); past that, an inverted
    file (``IndexIVFScalarQuantizer``, fp16) of ``min(4 * sqrt(n), NEAR_TRAIN / 39)`` lists
    searches the ``nprobe`` lists nearest each image: a pair split across lists that are not
    probed is missed, so a group may be found in parts.
    """
    import faiss

    uris: list[str] = []
    parts: list[np.ndarray] = []
    for batch in iter_embeddings(
        output, storage_options=storage_options, columns=("uri", "embedding")
    ):
        vectors = np.stack(batch["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
        faiss.normalize_L2(vectors)
        parts.append(vectors.astype(np.float16))
        uris += batch["uri"].cast(pa.string()).to_pylist()
    n = len(uris)
    if n < 2:
        return
    vectors16 = np.concatenate(parts)
    del parts
    index = _near_index(faiss, vectors16, nprobe)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    # A pair's similarity is at least ``threshold``: range search returns inner products
    # above its radius, so the radius sits a float32 step below.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-1)))
    for start in range(0, n, NEAR_BATCH):
        queries = vectors16[start : start + NEAR_BATCH].astype(np.float32)
        limits, _, labels = index.range_search(queries, radius)
        for q in range(len(queries)):
            for j in labels[limits[q] : limits[q + 1]]:
                a, b = root(start + q), root(int(j))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    components: dict[int, list[str]] = {}
    for i in range(n):
        components.setdefault(root(i), []).append(uris[i])
    found = [sorted(group) for group in components.values() if len(group) > 1]
    for group in sorted(found, key=lambda g: (-len(g), g[0])):
        yield {"kind": "near", "min_similarity": threshold, "uris": group}


def _near_index(faiss: Any, vectors16: np.ndarray, nprobe: int) -> Any:
    n = len(vectors16)
    metric = faiss.METRIC_INNER_PRODUCT
    if n <= NEAR_TRAIN:
        # Exact, as float32 (512 MiB at most): range search over a flat index is a matrix
        # product (BLAS); over fp16 codes it decodes each pair, and took over 10 minutes for
        # 20,000 vectors on 2 cores.
        index = faiss.IndexFlatIP(EMBEDDING_DIM)
    else:
        lists = min(int(4 * np.sqrt(n)), NEAR_TRAIN // 39)  # faiss wants 39 points a list
        quantizer = faiss.IndexFlatIP(EMBEDDING_DIM)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, EMBEDDING_DIM, lists, faiss.ScalarQuantizer.QT_fp16, metric
        )
        sample = np.random.default_rng(0).choice(n, NEAR_TRAIN, replace=False)
        index.train(vectors16[np.sort(sample)].astype(np.float32))
        index.nprobe = nprobe
    for start in range(0, n, NEAR_BATCH):
        index.add(vectors16[start : start + NEAR_BATCH].astype(np.float32))
    return index
