"""Stage 5: commit a run. Staged files move into the tables, then ``_manifest.json`` is written
last, in one atomic write: a run exists for readers only once its manifest does.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.storage import is_local, join, open_fs

MANIFEST_NAME = "_manifest.json"
STAGING_DIR = "_staging"
MANIFEST_FORMAT = "embed-images/manifest"
MANIFEST_VERSION = 1
TABLES = ("embeddings", "errors")


def read_manifest(
    output: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The output's manifest, or ``None`` when no run has committed there.

    Example:
        >>> read_manifest("/tmp/nowhere-yet") is None
        True
    """
    fs, root = open_fs(output, storage_options)
    return _read_manifest(fs, root)


def _read_manifest(fs: Any, root: str) -> dict[str, Any] | None:
    path = join(root, MANIFEST_NAME)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    manifest = json.loads(data)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an embed-images manifest")
    return dict(manifest)


def read_embeddings(
    output: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    table: str = "embeddings",
) -> pa.Table:
    """The current table of an output, as its manifest lists it: committed rows only.

    Args:
        output: The ``--output`` of the runs.
        storage_options: fsspec options for object stores.
        columns: Columns to read (default: all, plus the ``run_id`` partition column).
        table: ``embeddings`` or ``errors``.

    Returns:
        An Arrow table; empty (with the schema) when the manifest lists no file.

    Example:
        >>> t = read_embeddings("./out")  # doctest: +SKIP
        >>> t.column("embedding").type  # doctest: +SKIP
        FixedSizeListType(fixed_size_list<item: float>[2048])
    """
    from pipeline.write import EMBEDDINGS_SCHEMA, ERRORS_SCHEMA

    fs, root = open_fs(output, storage_options)
    manifest = _read_manifest(fs, root)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} under {output}: no run has committed there")
    files = [join(root, p) for p in manifest["current"][table]]
    schema = EMBEDDINGS_SCHEMA if table == "embeddings" else ERRORS_SCHEMA
    if not files:
        return schema.empty_table()
    dataset = pads.dataset(
        files,
        filesystem=fs,
        format="parquet",
        partitioning="hive",
        partition_base_dir=join(root, table),
    )
    return dataset.to_table(columns=list(columns) if columns else None)


def staging_uri(output: str, run_id: str) -> str:
    return join(output, STAGING_DIR, run_id)


def commit_run(
    output: str,
    *,
    run: Mapping[str, Any],
    staged: Mapping[str, Sequence[str]],
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Move a run's staged files into the tables and write the manifest, last.

    Args:
        output: The output root.
        run: The run's record (``run_id``, counts, times, model and preprocessing blocks).
        staged: Per table, file paths relative to the run's staging folder
            (``embeddings/part-….parquet``), exactly those the pipeline returned.
        storage_options: fsspec options for object stores.

    Returns:
        The manifest as written.
    """
    fs, root = open_fs(output, storage_options)
    run_id = str(run["run_id"])
    stage_root = join(root, STAGING_DIR, run_id)
    committed: dict[str, list[str]] = {}
    for table in TABLES:
        committed[table] = []
        for relative in sorted(staged.get(table, ())):
            name = relative.rsplit("/", 1)[-1]
            final = f"{table}/run_id={run_id}/{name}"
            fs.makedirs(join(root, table, f"run_id={run_id}"), exist_ok=True)
            fs.mv(join(stage_root, relative), join(root, final))
            committed[table].append(final)
    manifest = _read_manifest(fs, root) or {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "current": {table: [] for table in TABLES},
        "runs": [],
    }
    record = dict(run) | {"files": committed}
    manifest["runs"].append(record)
    for table in TABLES:
        manifest["current"][table] = sorted(manifest["current"][table] + committed[table])
    for key in ("model", "preprocessing"):
        if key in run:
            manifest[key] = run[key]
    _write_atomically(fs, join(root, MANIFEST_NAME), json.dumps(manifest, indent=2).encode())
    # Staging is scratch once the manifest is in place; leftovers of retried tasks go with it.
    remove_tree(fs, stage_root)
    staging = join(root, STAGING_DIR)
    if is_local(fs) and fs.exists(staging) and not fs.ls(staging):
        fs.rmdir(staging)
    return manifest


def discard_uncommitted(output: str, *, storage_options: Mapping[str, Any] | None = None) -> int:
    """Delete what runs that never committed left behind; returns the number of paths removed.

    A run killed after moving files but before its manifest leaves ``run_id=…`` folders that
    no manifest lists; the plain dataset read would see them, so the next run removes them,
    together with stale staging. One writer per output at a time is assumed.
    """
    fs, root = open_fs(output, storage_options)
    manifest = _read_manifest(fs, root)
    committed_runs = {str(r["run_id"]) for r in manifest["runs"]} if manifest else set()
    removed = 0
    for table in TABLES:
        table_root = join(root, table)
        if not fs.exists(table_root):
            continue
        for entry in fs.ls(table_root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("run_id=") and name[len("run_id=") :] not in committed_runs:
                remove_tree(fs, entry)
                removed += 1
    stage = join(root, STAGING_DIR)
    if fs.exists(stage):
        remove_tree(fs, stage)
        removed += 1
    return removed


def remove_tree(fs: Any, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _write_atomically(fs: Any, path: str, data: bytes) -> None:
    if is_local(fs):
        # Write beside the target and rename: readers see the old manifest or the new one.
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        # An object store PUT is atomic: the object is the old one or the new one.
        fs.pipe_file(path, data)
