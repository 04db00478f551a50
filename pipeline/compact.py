"""Maintenance: rewrite an output's current table into fresh files, and commit it atomically.

    read_embeddings_dataset (Ray tasks: current rows only) -> write_table_file (Ray tasks,
    into OUTPUT/_staging/RUN_ID/) -> commit_run(replace=True) -> earlier files deleted

Nightly runs add small files and leave superseded rows (changed or deleted images) in place;
readers that go through the manifest skip them, a plain ``pyarrow.dataset`` read does not.
After a compaction the table is current rows only, in files of ``rows_per_file`` rows, in the
compaction's own ``run_id=…`` folder; deletions are applied and the manifest lists only the
A compaction holds a lease like a run (a run or compaction alive on the output refuses it,
and it refuses them). One killed before its manifest is written changes nothing; one killed
after it leaves superseded files that no manifest lists. Either way the clean-up at a later
start removes the leftovers once they are older than its retention.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.commit import commit_run
from pipeline.config import PipelineError
from pipeline.manifest import COMPACTED, RunCounts, RunRecord, new_run_id, utc_iso
from pipeline.output import CLEANUP_RETENTION_SECONDS, Output, Snapshot
from pipeline.read import read_embeddings_dataset
from pipeline.storage import join, open_fs
from pipeline.write import EMBEDDINGS_SCHEMA, ERRORS_SCHEMA, file_metadata, write_parquet_file

# Rows per compacted file: some 80 MB of float32 vectors, a good Parquet file size to scan.
COMPACT_ROWS_PER_FILE = 10_000


def write_table_file(
    batch: pa.Table,
    *,
    table: str,
    staging_uri: str,
    storage_options: Mapping[str, Any],
    metadata: Mapping[str, str],
) -> dict[str, np.ndarray]:
    """Write one batch of current rows as one Parquet file (a ``map_batches`` function);
    returns one row: its path relative to the staging folder, and its rows."""
    if batch.num_rows == 0:
        return {"path": np.zeros(0, dtype=object), "rows": np.zeros(0, dtype=np.int64)}
    schema = EMBEDDINGS_SCHEMA if table == "embeddings" else ERRORS_SCHEMA
    rows = batch.select(schema.names).cast(schema).replace_schema_metadata(dict(metadata))
    fs, root = open_fs(staging_uri, storage_options)
    relative = f"{table}/part-{uuid.uuid4().hex}.parquet"
    write_parquet_file(fs, join(root, relative), rows)
    return {
        "path": np.asarray([relative], dtype=object),
        "rows": np.asarray([rows.num_rows], dtype=np.int64),
    }


def compact(
    output: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    rows_per_file: int = COMPACT_ROWS_PER_FILE,
    cleanup_retention: float = CLEANUP_RETENTION_SECONDS,
) -> RunRecord:
    """Rewrite ``output``'s current embeddings and errors into fresh files (on the running
    Ray) and commit them in place of every earlier file.

    A ``--full`` run's pending files (:class:`pipeline.manifest.Pending`) are left as they
    are. Failures that runs' verdicts refused are rewritten with the rest and count as
    accepted from then on.

    Returns:
        The compaction's record in the manifest (status ``compacted``).

    Raises:
        PipelineError: nothing committed yet, or another run committed meanwhile.
    """
    started, started_at = time.time(), utc_iso()
    out = Output(output, storage_options)
    snapshot = out.snapshot()
    manifest = snapshot.manifest
    if manifest is None or manifest.model is None:
        raise PipelineError(f"nothing to compact: no run has committed to {out.uri}")
    run_id = f"{new_run_id()}-compact"
    with out.lease(run_id, what="compaction"):
        out.remove_orphans(retention=cleanup_retention)
        return _compact(out, snapshot, run_id, rows_per_file, started, started_at)


def _compact(
    out: Output,
    snapshot: Snapshot,
    run_id: str,
    rows_per_file: int,
    started: float,
    started_at: str,
) -> RunRecord:
    from pipeline.read import read_embeddings

    manifest = snapshot.manifest
    assert manifest is not None and manifest.model is not None
    output, storage_options = out.uri, out.storage_options
    kwargs = {
        "staging_uri": out.staging_uri(run_id),
        "storage_options": out.storage_options,
        "metadata": file_metadata(
            model=manifest.model, preprocessing=manifest.preprocessing or {}, run_id=run_id
        ),
    }
    staged: dict[str, list[str]] = {"embeddings": [], "errors": []}
    counts = {"embeddings": 0, "errors": 0}
    if manifest.current.get("embeddings"):
        written = read_embeddings_dataset(output, storage_options=storage_options).map_batches(
            write_table_file,  # type: ignore[arg-type]
            batch_size=rows_per_file,
            batch_format="pyarrow",
            fn_kwargs={"table": "embeddings", **kwargs},
        )
        for batch in written.iter_batches(batch_size=None, batch_format="numpy"):
            staged["embeddings"] += [str(p) for p in batch["path"]]
            counts["embeddings"] += int(batch["rows"].sum())
    errors = read_embeddings(output, storage_options=storage_options, table="errors")
    for start in range(0, errors.num_rows, rows_per_file):
        one = write_table_file(
            errors.slice(start, rows_per_file),
            table="errors",
            **kwargs,  # type: ignore[arg-type]
        )
        staged["errors"] += [str(p) for p in one["path"]]
        counts["errors"] += int(one["rows"].sum())
    record = RunRecord(
        run_id=run_id,
        status=COMPACTED,
        input=json.dumps({"compacted": out.uri}),
        counts=RunCounts(embedded=counts["embeddings"], failed=counts["errors"]),
        model=manifest.model,
        preprocessing=manifest.preprocessing or {},
        started_at=started_at,
        finished_at=utc_iso(),
        wall_seconds=round(time.time() - started, 3),
    )
    commit_run(out, snapshot, record, staged=staged, replace=True)
    return record
