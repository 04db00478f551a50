"""Reading an output: its current rows, each image once, from the files its manifest lists.

Every reader takes a :class:`~pipeline.output.Snapshot`, so one call reads the manifest once;
which rows are current is decided in :mod:`pipeline.current`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.current import (
    EMBEDDINGS_KEY_COLUMNS,
    ERRORS_KEY_COLUMNS,
    CommittedImages,
    KeyIndex,
    resolve_current,
    resolve_rows,
)
from pipeline.manifest import Manifest
from pipeline.output import Output, Snapshot
from pipeline.storage import arrow_filesystem, is_local, join
from pipeline.write import DELETIONS_SCHEMA, EMBEDDINGS_SCHEMA, ERRORS_SCHEMA


def current_tables(
    output: Output,
    snapshot: Snapshot,
    *,
    embeddings: Sequence[str] | None = None,
    errors: Sequence[str] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """The current embeddings and errors rows: committed files only, each image once.

    After several runs an image may have rows in more than one run (it changed) or may
    have been deleted from the input; this keeps the latest row per URI and drops deleted
    URIs. Each table is read once.

    Args:
        snapshot: From :meth:`Output.snapshot`.
        embeddings: Columns of the embeddings table (``None``: all, with ``run_id``).
        errors: Columns of the errors table (``None``: all, with ``run_id``).
    """
    manifest = output.require(snapshot)
    narrow = ["uri", "run_id"]
    emb = load_table(output, manifest, "embeddings", _with(embeddings, narrow))
    err = load_table(output, manifest, "errors", _with(errors, narrow))
    gone = load_table(output, manifest, "deletions", narrow)
    emb, err = resolve_current(emb, err, gone, order=manifest.commit_order())
    return (
        emb.select(list(embeddings)) if embeddings else emb,
        err.select(list(errors)) if errors else err,
    )


def superseded_rows(output: Output, snapshot: Snapshot) -> pa.Table:
    """``(uri, run_id)`` of the rows in current embeddings files that are not current: the
    image changed in a later run, is gone, or was listed twice."""
    manifest = output.require(snapshot)
    narrow = ["uri", "run_id"]
    emb = load_table(output, manifest, "embeddings", narrow, large=True)
    if emb.num_rows == 0:
        return pa.table({c: pa.array([], pa.string()) for c in narrow})
    err = load_table(output, manifest, "errors", narrow, large=True)
    gone = load_table(output, manifest, "deletions", narrow, large=True)
    current, _ = resolve_rows(emb, err, gone, order=manifest.commit_order())
    stale = np.ones(emb.num_rows, dtype=bool)
    stale[current] = False
    return pa.table({c: emb[c].filter(pa.array(stale)).cast(pa.string()) for c in narrow})


def iter_current(
    output: Output, snapshot: Snapshot, *, columns: Sequence[str], batch_size: int
) -> Iterator[pa.RecordBatch]:
    """Stream the current embeddings in record batches (see :func:`iter_embeddings`)."""
    manifest = output.require(snapshot)
    files = [join(output.root, p) for p in manifest.current.get("embeddings", [])]
    if not files:
        return
    current, _ = current_tables(output, snapshot, embeddings=["uri", "run_id"], errors=["uri"])
    # Each batch is looked up in one index of the current (uri, run_id) keys, built once.
    index = KeyIndex(current, ["uri", "run_id"])
    dataset = table_dataset(output, "embeddings", files)
    wanted = list(dict.fromkeys([*columns, "uri", "run_id"]))
    for batch in dataset.to_batches(columns=wanted, batch_size=batch_size):
        kept = batch.filter(pa.array(index.find(pa.Table.from_batches([batch])) >= 0))
        if kept.num_rows:
            yield kept.select(list(columns))


def committed_images(
    output: Output, manifest: Manifest, *, pending: bool = False
) -> CommittedImages:
    """The current images' keys, indexed for a run's diff; the key columns are read once,
    as ``large_string``, and indexed where they lie (superseded rows are skipped, not
    copied out).

    Args:
        manifest: The output's, as read once (:meth:`Output.snapshot`).
        pending: The pending files of a ``--full`` run instead (one resuming them).
    """
    if pending:
        assert manifest.pending is not None
        manifest = Manifest(
            current=manifest.pending.files,
            runs=[],
            sequence={r: n for n, r in enumerate(manifest.pending.runs)},
        )
    emb = load_table(
        output, manifest, "embeddings", [*EMBEDDINGS_KEY_COLUMNS, "run_id"], large=True
    )
    err = load_table(output, manifest, "errors", [*ERRORS_KEY_COLUMNS, "run_id"], large=True)
    gone = load_table(output, manifest, "deletions", ["uri", "run_id"], large=True)
    order = manifest.commit_order()
    return CommittedImages(
        emb, err, resolve_rows(emb, err, gone, order=order), refused=manifest.refused
    )


def load_table(
    output: Output,
    manifest: Manifest,
    table: str,
    columns: list[str] | None,
    *,
    large: bool = False,
) -> pa.Table:
    files = [join(output.root, p) for p in manifest.current.get(table, [])]
    if not files:
        empty = table_schema(table).empty_table()
        return empty.select(columns) if columns else empty
    return table_dataset(output, table, files, large=large).to_table(columns=columns)


def table_dataset(
    output: Output, table: str, files: list[str], *, large: bool = False
) -> pads.Dataset:
    """The listed files of one table, with ``run_id`` (always a string) from their folders;
    ``large``: string columns read as ``large_string``.

    The schema is the table's own, not the first file's: a column added since older files
    were written (``content_sha256``) reads as null in them."""
    schema = table_schema(table)
    if large:
        schema = pa.schema(
            [f.with_type(pa.large_string()) if f.type == pa.string() else f for f in schema]
        )
    return pads.dataset(
        files,
        schema=schema,
        filesystem=arrow_filesystem(output.fs),
        format="parquet",
        partitioning=pads.partitioning(pa.schema([("run_id", pa.string())]), flavor="hive"),
        partition_base_dir=join(output.root, table),
    )


def table_schema(table: str) -> pa.Schema:
    """A table's columns as readers see them: the written ones and ``run_id``."""
    written = {"embeddings": EMBEDDINGS_SCHEMA, "errors": ERRORS_SCHEMA}.get(
        table, DELETIONS_SCHEMA
    )
    return written.append(pa.field("run_id", pa.string()))


def _with(columns: Sequence[str] | None, required: list[str]) -> list[str] | None:
    if columns is None:
        return None
    return list(columns) + [c for c in required if c not in columns]


# -- the readers' API: each call reads the manifest once -----------------------------


def read_manifest(
    output: str, *, storage_options: Mapping[str, Any] | None = None
) -> Manifest | None:
    """The output's manifest, or ``None`` when no run has committed there.

    Example:
        >>> read_manifest("/tmp/nowhere-yet") is None
        True
    """
    return Output(output, storage_options).snapshot().manifest


def read_embeddings(
    output: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    table: str = "embeddings",
) -> pa.Table:
    """The current table of an output: committed rows only, each image once.

    Args:
        output: The ``--output`` of the runs.
        storage_options: fsspec options for object stores.
        columns: Columns to return (default: all, plus the ``run_id`` partition column).
        table: ``embeddings`` or ``errors``.

    Returns:
        An Arrow table; empty (with the schema) when the manifest lists no file.

    Example:
        >>> t = read_embeddings("./out")  # doctest: +SKIP
        >>> t.column("embedding").type  # doctest: +SKIP
        FixedSizeListType(fixed_size_list<item: float>[2048])
    """
    out = Output(output, storage_options)
    narrow = ["uri"]
    if table == "embeddings":
        return current_tables(out, out.snapshot(), embeddings=columns, errors=narrow)[0]
    return current_tables(out, out.snapshot(), embeddings=narrow, errors=columns)[1]


def iter_embeddings(
    output: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    columns: Sequence[str] = ("uri", "original_width", "original_height", "embedding"),
    batch_size: int = 4096,
) -> Iterator[pa.RecordBatch]:
    """Stream the current embeddings in record batches, never the whole table at once.

    Only the narrow ``(uri, run_id)`` columns are read in full, to know which rows are
    current; the wide columns (the vectors) are read batch by batch.

    Example:
        >>> for batch in iter_embeddings("./out", batch_size=1024):  # doctest: +SKIP
        ...     index.add(np.stack(batch["embedding"].to_numpy(zero_copy_only=False)))
    """
    out = Output(output, storage_options)
    yield from iter_current(out, out.snapshot(), columns=columns, batch_size=batch_size)


def read_embeddings_dataset(
    output: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    columns: Sequence[str] | None = None,
) -> Any:
    """The current embeddings as a ``ray.data.Dataset``, read by Ray's tasks, not the driver:
    for loading a vector database from many workers.

    The committed files are read with ``ray.data.read_parquet`` (``run_id`` from the hive
    folders). Rows a later run superseded (the image changed, or is gone) are dropped in the
    read tasks, which get only those rows' ``(uri, run_id)`` keys; finding them reads the
    narrow key columns in the driver, once, as a run's diff does.

    Example:
        >>> ds = read_embeddings_dataset("s3://bucket/embeddings/resnet50/")  # doctest: +SKIP
        >>> ds.iter_batches(batch_size=4096)  # doctest: +SKIP
    """
    import ray
    from ray.data.datasource import Partitioning

    out = Output(output, storage_options)
    snapshot = out.snapshot()
    manifest = out.require(snapshot)
    files = [join(out.root, p) for p in manifest.current.get("embeddings", [])]
    wanted = list(columns) if columns else None
    if not files:
        raise FileNotFoundError(f"{out.uri} holds no embeddings")
    superseded = superseded_rows(out, snapshot)
    dataset = ray.data.read_parquet(
        files,
        filesystem=None if is_local(out.fs) else arrow_filesystem(out.fs),
        partitioning=Partitioning(
            "hive",  # type: ignore[arg-type]
            base_dir=join(out.root, "embeddings"),
            field_types={"run_id": str},
        ),
        columns=_with(wanted, ["uri", "run_id"]) if superseded.num_rows and wanted else wanted,
        # The table's schema, not the first file's: older files lack content_sha256.
        schema=table_schema("embeddings"),
    )
    if superseded.num_rows:
        dataset = dataset.map_batches(
            _drop_superseded,  # type: ignore[arg-type]
            batch_format="pyarrow",
            fn_kwargs={"superseded": superseded, "columns": wanted},
        )
    return dataset


def _drop_superseded(
    batch: pa.Table, *, superseded: pa.Table, columns: list[str] | None
) -> pa.Table:
    keys = pa.table({c: batch[c].cast(pa.string()) for c in ("uri", "run_id")})
    kept = batch.filter(pa.array(KeyIndex(superseded, ["uri", "run_id"]).find(keys) < 0))
    return kept.select(columns) if columns else kept
