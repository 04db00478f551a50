"""Stage 4 (CPU tasks): write ``embeddings`` and ``errors`` Parquet files into the run's staging.

Each call writes uniquely named files and returns their paths; only the paths the driver
receives are committed, so a retried task's leftovers are never part of the table.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embed import EMBEDDING_DIM, ModelIdentity
from pipeline.failures import Failures, failures_by_type
from pipeline.probe import Probe, ProbeResult, compare_probes, probe_rows
from pipeline.quality import Quality, batch_quality, gate_refusal
from pipeline.reuse import CONTENT_COLUMN, CONTENT_TYPE, fill_reused, take_index
from pipeline.storage import join, make_parent, open_fs

EMBEDDINGS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("original_width", pa.int32(), nullable=False),
        pa.field("original_height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("file_size", pa.int64(), nullable=False),
        # Added to the contract's columns: what incremental runs compare (ETag or mtime).
        pa.field("source_version", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM), nullable=False),
        # The sha256 of the file's bytes (pipeline.reuse); null in rows written before 0.9.
        pa.field(CONTENT_COLUMN, CONTENT_TYPE),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("error_message", pa.string(), nullable=False),
        pa.field("file_size", pa.int64(), nullable=False),
        pa.field("source_version", pa.string(), nullable=False),
    ]
)

# Rows per Parquet row group: a row reused by content (pipeline.reuse) is read with its row
# group, 2 MiB of vectors, not its whole file. As many as a decode task's batch: a writer's
# rows come in such runs of listing order (bench.reuse measured 1,024-row groups read ~4 times
# over on S3).
ROW_GROUP_ROWS = 256

DELETIONS_SCHEMA = pa.schema([pa.field("uri", pa.string(), nullable=False)])


def file_metadata(
    *, model: ModelIdentity, preprocessing: Mapping[str, Any], run_id: str
) -> dict[str, str]:
    """The key-value metadata every Parquet file of a run carries (values are strings)."""
    from pipeline import __version__

    return model.to_parquet_metadata() | {
        "preprocessing": json.dumps(dict(preprocessing), sort_keys=True),
        "pipeline_version": __version__,
        "run_id": run_id,
    }


def write_batch(
    batch: dict[str, np.ndarray],
    *,
    staging_uri: str,
    storage_options: Mapping[str, Any],
    metadata: Mapping[str, str],
) -> dict[str, np.ndarray]:
    """Write one batch's rows as Parquet (a Ray Data ``map_batches`` function).

    Args:
        batch: Embedded rows, failed rows flagged by a non-empty ``error_type``.
        staging_uri: The run's staging folder.
        storage_options: fsspec options for the output store.
        metadata: From :func:`file_metadata`.

    Returns:
        One row per file written: ``table`` (``embeddings`` or ``errors``), ``path`` (relative
        to the staging folder) and ``rows``.
    """
    # Rows in URI order: a file's row groups then cover narrow ranges of URIs (their min/max
    # statistics let readers skip them), and the stored rows of a moved folder, which a later
    # run copies (pipeline.reuse), lie together.
    order = np.argsort(np.asarray(batch["uri"], dtype=str), kind="stable")
    batch = {key: values[order] for key, values in batch.items()}
    failed = np.asarray(batch["error_type"] != "", dtype=bool)
    ok = ~failed
    written: dict[str, list[Any]] = {"table": [], "path": [], "rows": []}
    fs, root = open_fs(staging_uri, storage_options)
    name = f"part-{uuid.uuid4().hex}.parquet"
    if ok.any():
        table = embeddings_table(batch, ok).replace_schema_metadata(dict(metadata))
        write_parquet_file(fs, join(root, "embeddings", name), table)
        written["table"].append("embeddings")
        written["path"].append(f"embeddings/{name}")
        written["rows"].append(table.num_rows)
    if failed.any():
        table = errors_table(batch, failed).replace_schema_metadata(dict(metadata))
        write_parquet_file(fs, join(root, "errors", name), table)
        written["table"].append("errors")
        written["path"].append(f"errors/{name}")
        written["rows"].append(table.num_rows)
    return {
        "table": np.asarray(written["table"], dtype=object),
        "path": np.asarray(written["path"], dtype=object),
        "rows": np.asarray(written["rows"], dtype=np.int64),
    }


def embeddings_table(batch: dict[str, np.ndarray], mask: np.ndarray) -> pa.Table:
    embeddings = np.ascontiguousarray(batch["embedding"][mask], dtype=np.float32)
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    return pa.table(
        [
            pa.array([str(u) for u in batch["uri"][mask]], pa.string()),
            pa.array(batch["original_width"][mask], pa.int32()),
            pa.array(batch["original_height"][mask], pa.int32()),
            pa.array([str(f) for f in batch["format"][mask]], pa.string()),
            pa.array(batch["file_size"][mask], pa.int64()),
            pa.array([str(v) for v in batch["source_version"][mask]], pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, EMBEDDING_DIM),
            _digests(batch, mask),
        ],
        schema=EMBEDDINGS_SCHEMA,
    )


def _digests(batch: dict[str, np.ndarray], mask: np.ndarray) -> pa.Array:
    if CONTENT_COLUMN not in batch:
        return pa.nulls(int(mask.sum()), CONTENT_TYPE)
    digests = [bytes(d) if d is not None and len(d) else None for d in batch[CONTENT_COLUMN][mask]]
    return pa.array(digests, CONTENT_TYPE)


def errors_table(batch: dict[str, np.ndarray], mask: np.ndarray) -> pa.Table:
    return pa.table(
        [
            pa.array([str(u) for u in batch["uri"][mask]], pa.string()),
            pa.array([str(t) for t in batch["error_type"][mask]], pa.string()),
            pa.array([str(m) for m in batch["error_message"][mask]], pa.string()),
            pa.array(batch["file_size"][mask], pa.int64()),
            pa.array([str(v) for v in batch["source_version"][mask]], pa.string()),
        ],
        schema=ERRORS_SCHEMA,
    )


def write_parquet_file(fs: Any, path: str, table: pa.Table) -> None:
    """Write ``table`` to ``path`` in one PUT, and check that the store holds every byte."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    data = buffer.getvalue()
    make_parent(fs, path)
    fs.pipe_file(path, data)
    # A file is handed on to the commit only once the store reports all of its bytes.
    fs.invalidate_cache(path)
    size = int(fs.info(path)["size"])
    if size != len(data):
        raise OSError(f"{path}: the store holds {size} of the {len(data)} bytes written")


class Staged(TypedDict):
    """What one writer task returns to the driver."""

    # (table, path relative to the run's staging folder, rows) per file written.
    files: list[tuple[str, str, int]]
    failures: dict[str, Failures]
    quality: Quality  # the statistics of the vectors written
    reused: int  # rows whose vectors were copied from the table (found by their content)
    probe: list[ProbeResult]  # the probe's rows in the batch, compared (not written)
    refusal: str  # why the quality gate refuses them; "" if it does not
    finished_at: float  # when the task's files were written: the run report's throughput


def write_files(
    batch: dict[str, np.ndarray],
    *,
    staging_uri: str,
    storage_options: Mapping[str, Any],
    metadata: Mapping[str, str],
    reuse: Any = None,
    probes: Sequence[Probe] = (),
) -> dict[str, np.ndarray]:
    """The writer stage (a ``map_batches`` function): compare the probe's rows with their
    stored vectors (``probes``, which carry them; they are not written),
    copy the stored vectors of images found by their content (``reuse``: the table's
    :class:`~pipeline.reuse.ContentIndex`), write the batch, and return one row that tells the
    driver what was written (:class:`Staged`, as JSON)."""
    if not len(batch["uri"]):
        return {"staged": np.zeros(0, dtype=object)}
    probed: list[ProbeResult] = []
    if probes:
        rows = probe_rows(batch, probes)
        if rows.any():
            probed = compare_probes(batch, rows, probes)
            batch = {key: values[~rows] for key, values in batch.items()}
    index = take_index(reuse)
    reused = fill_reused(batch, index, storage_options) if index is not None else 0
    failed = np.asarray(batch["error_type"] != "", dtype=bool)
    out = write_batch(
        batch, staging_uri=staging_uri, storage_options=storage_options, metadata=metadata
    )
    quality = batch_quality(batch["embedding"][~failed], batch["uri"][~failed])
    staged: Staged = {
        "files": [
            (str(t), str(p), int(n))
            for t, p, n in zip(out["table"], out["path"], out["rows"], strict=True)
        ],
        "failures": failures_by_type(
            batch["error_type"][failed], batch["uri"][failed], batch["error_message"][failed]
        ),
        "quality": quality,
        "reused": reused,
        "probe": probed,
        "refusal": gate_refusal(quality) or "",
        "finished_at": time.time(),
    }
    return {"staged": np.asarray([json.dumps(staged)], dtype=object)}
