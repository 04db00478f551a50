"""After the tables: stream the current embeddings into a FAISS index or a LanceDB table.

Both read the table batch by batch (``iter_embeddings``): memory holds one batch of vectors,
plus the index being built (FAISS keeps its vectors in RAM by design).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PipelineError
from pipeline.embed import EMBEDDING_DIM
from pipeline.read import iter_embeddings
from pipeline.storage import is_local, open_fs

IDS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("original_width", pa.int32(), nullable=False),
        pa.field("original_height", pa.int32(), nullable=False),
    ]
)


def _vectors(batch: pa.RecordBatch, normalize: bool) -> np.ndarray:
    vectors = batch["embedding"].flatten().to_numpy().reshape(batch.num_rows, EMBEDDING_DIM)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PipelineError(
            f"{module} is not installed: pip install 'embed-images[{extra}]'"
        ) from None


def check_destination(dest: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse a local destination whose folder does not exist: a typo should not create one.

    Example:
        >>> check_destination("/tmp/index.faiss")  # /tmp exists: nothing to refuse
    """
    fs, path = open_fs(dest, storage_options)
    if is_local(fs):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise PipelineError(
                f"export destination {dest}: folder {parent} does not exist; create it first"
            )


def export_faiss(
    output: str,
    dest: str,
    *,
    normalize: bool = False,
    float16: bool = False,
    batch_size: int = 4096,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write a FAISS index of ``output``'s current embeddings to ``dest``.

    Beside it, ``dest + ".ids.parquet"`` maps each FAISS id (row order) to its ``uri`` and
    original dimensions.

    Args:
        output: An ``embed-images`` output.
        dest: Index file (local path or fsspec URL).
        normalize: L2-normalize and use inner product: cosine similarity.
        float16: Store vectors as float16 (``IndexScalarQuantizer`` QT_fp16): half the memory.
        batch_size: Rows per streamed batch.
        storage_options: fsspec options.

    Returns:
        The number of vectors indexed.

    Example:
        >>> export_faiss("./out", "./out.faiss", normalize=True)  # doctest: +SKIP
        1204
    """
    faiss = _require("faiss", "search")
    metric = faiss.METRIC_INNER_PRODUCT if normalize else faiss.METRIC_L2
    if float16:
        index = faiss.IndexScalarQuantizer(EMBEDDING_DIM, faiss.ScalarQuantizer.QT_fp16, metric)
    else:
        index = faiss.IndexFlat(EMBEDDING_DIM, metric)
    check_destination(dest, storage_options)
    fs, path = open_fs(dest, storage_options)
    with tempfile.TemporaryDirectory() as scratch:
        local_index = path if is_local(fs) else os.path.join(scratch, "index.faiss")
        local_ids = local_index + ".ids.parquet"
        count = 0
        with pq.ParquetWriter(local_ids, IDS_SCHEMA) as ids:
            for batch in iter_embeddings(
                output, storage_options=storage_options, batch_size=batch_size
            ):
                index.add(_vectors(batch, normalize))
                ids.write_table(
                    pa.table(
                        {
                            "id": pa.array(range(count, count + batch.num_rows), pa.int64()),
                            "uri": batch["uri"].cast(pa.string()),
                            "original_width": batch["original_width"],
                            "original_height": batch["original_height"],
                        },
                        schema=IDS_SCHEMA,
                    )
                )
                count += batch.num_rows
        faiss.write_index(index, local_index)
        if not is_local(fs):
            fs.put_file(local_index, path)
            fs.put_file(local_ids, path + ".ids.parquet")
    return count


def export_lancedb(
    output: str,
    dest: str,
    *,
    table: str = "embeddings",
    normalize: bool = False,
    float16: bool = False,
    batch_size: int = 4096,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write ``output``'s current embeddings as a LanceDB table (``vector`` column) at ``dest``.

    Args:
        output: An ``embed-images`` output.
        dest: LanceDB database URI (a folder, or ``s3://…``).
        table: Table name (replaced if it exists).
        normalize: L2-normalize the vectors (then search with ``metric="cosine"`` or "dot").
        float16: Store the vectors as float16.
        batch_size: Rows per streamed batch.
        storage_options: fsspec options for reading ``output``.

    Returns:
        The number of rows written.
    """
    lancedb = _require("lancedb", "search")
    check_destination(dest, storage_options)
    value_type = pa.float16() if float16 else pa.float32()
    schema = pa.schema(
        [
            pa.field("uri", pa.string()),
            pa.field("original_width", pa.int32()),
            pa.field("original_height", pa.int32()),
            pa.field("vector", pa.list_(value_type, EMBEDDING_DIM)),
        ]
    )
    count = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal count
        for batch in iter_embeddings(
            output, storage_options=storage_options, batch_size=batch_size
        ):
            vectors = _vectors(batch, normalize).astype(np.float16 if float16 else np.float32)
            flat = pa.array(vectors.reshape(-1), type=value_type)
            count += batch.num_rows
            yield pa.RecordBatch.from_arrays(
                [
                    batch["uri"].cast(pa.string()),
                    batch["original_width"],
                    batch["original_height"],
                    pa.FixedSizeListArray.from_arrays(flat, EMBEDDING_DIM),
                ],
                schema=schema,
            )

    database = lancedb.connect(dest)
    database.create_table(table, data=batches(), schema=schema, mode="overwrite")
    return count
