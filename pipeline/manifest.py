"""Stage 5: commit a run. Staged files move into the tables, then ``_manifest.json`` is written
last, in one atomic write: a run exists for readers only once its manifest does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import PipelineError
from pipeline.storage import is_local, join, make_parent, open_fs

MANIFEST_NAME = "_manifest.json"
LOCK_NAME = "_commit.lock"  # local disk only; pyarrow's dataset discovery skips "_" names
STAGING_DIR = "_staging"
MANIFEST_FORMAT = "embed-images/manifest"
MANIFEST_VERSION = 1
UNCHECKED = object()  # commit_run: read the manifest's version now rather than compare
TABLES = ("embeddings", "errors", "deletions")


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
    """The current table of an output: committed rows only, each image once.

    After several runs an image may have rows in more than one run (it changed) or may have
    been deleted from the input; this keeps the latest row per URI and drops deleted URIs.

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
    from pipeline.incremental import resolve_current

    fs, root = open_fs(output, storage_options)
    manifest = _read_manifest(fs, root)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} under {output}: no run has committed there")
    wanted = list(columns) if columns else None
    narrow = ["uri", "run_id"]
    loaded = {
        name: _load_table(
            fs, root, manifest, name, _with(wanted, narrow) if name == table else narrow
        )
        for name in TABLES
    }
    if len(manifest["runs"]) > 1:
        embeddings, errors = resolve_current(
            loaded["embeddings"], loaded["errors"], loaded["deletions"]
        )
        result = embeddings if table == "embeddings" else errors
    else:
        result = loaded[table]
    return result.select(wanted) if wanted else result


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
    import pyarrow.compute as pc

    fs, root = open_fs(output, storage_options)
    manifest = _read_manifest(fs, root)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} under {output}: no run has committed there")
    files = [join(root, p) for p in manifest["current"].get("embeddings", [])]
    if not files:
        return
    current = read_embeddings(output, storage_options=storage_options, columns=["uri", "run_id"])
    keys = pc.binary_join_element_wise(current["uri"], current["run_id"].cast(pa.string()), "\x00")
    dataset = _run_dataset(fs, root, "embeddings", files)
    wanted = list(dict.fromkeys([*columns, "uri", "run_id"]))
    for batch in dataset.to_batches(columns=wanted, batch_size=batch_size):
        batch_keys = pc.binary_join_element_wise(batch["uri"], batch["run_id"], "\x00")
        kept = batch.filter(pc.is_in(batch_keys, value_set=keys))
        if kept.num_rows:
            yield kept.select(list(columns))


def _with(columns: list[str] | None, required: list[str]) -> list[str] | None:
    if columns is None:
        return None
    return columns + [c for c in required if c not in columns]


def _load_table(
    fs: Any, root: str, manifest: Mapping[str, Any], table: str, columns: list[str] | None
) -> pa.Table:
    from pipeline.write import DELETIONS_SCHEMA, EMBEDDINGS_SCHEMA, ERRORS_SCHEMA

    schema = {"embeddings": EMBEDDINGS_SCHEMA, "errors": ERRORS_SCHEMA}.get(table, DELETIONS_SCHEMA)
    files = [join(root, p) for p in manifest["current"].get(table, [])]
    if not files:
        empty = schema.append(pa.field("run_id", pa.string())).empty_table()
        return empty.select(columns) if columns else empty
    return _run_dataset(fs, root, table, files).to_table(columns=columns)


def _run_dataset(fs: Any, root: str, table: str, files: list[str]) -> pads.Dataset:
    """The listed files of one table, with ``run_id`` (always a string) from their folders."""
    return pads.dataset(
        files,
        filesystem=fs,
        format="parquet",
        partitioning=pads.partitioning(pa.schema([("run_id", pa.string())]), flavor="hive"),
        partition_base_dir=join(root, table),
    )


def staging_uri(output: str, run_id: str) -> str:
    return join(output, STAGING_DIR, run_id)


def commit_run(
    output: str,
    *,
    run: Mapping[str, Any],
    staged: Mapping[str, Sequence[str]],
    deleted_uris: pa.Array | None = None,
    replace: bool = False,
    expected_version: str | None | object = UNCHECKED,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Move a run's staged files into the tables and write the manifest, last.

    Args:
        output: The output root.
        run: The run's record (``run_id``, counts, times, model and preprocessing blocks).
        staged: Per table, file paths relative to the run's staging folder
            (``embeddings/part-….parquet``), exactly those the pipeline returned.
        deleted_uris: URIs this run found gone from the input, recorded in ``deletions/``.
        replace: This run re-embedded everything (``--full``): earlier files stop being
            current, and are deleted once the new manifest is in place.
        expected_version: :func:`manifest_version` when the run started (``None``: there was
            no manifest). If another run has committed since, nothing is moved or written and
            :class:`ConcurrentCommitError` is raised; on S3 the manifest PUT itself is
            conditional (``If-None-Match: *`` for the first run, ``If-Match: ETAG`` after);
            on local disk the whole commit (check, moves, manifest) holds ``_commit.lock``.
        storage_options: fsspec options for object stores.

    Returns:
        The manifest as written.
    """
    fs, root = open_fs(output, storage_options)
    with _commit_lock(fs, root):
        return _commit(fs, root, output, run, staged, deleted_uris, replace, expected_version)


@contextlib.contextmanager
def _commit_lock(fs: Any, root: str) -> Iterator[None]:
    """On local disk, one commit at a time per output: check, moves and manifest together.

    An exclusive ``flock`` on ``_commit.lock``, which the kernel releases when its holder dies,
    so a killed run leaves no stale lock. Object stores need none: the manifest PUT itself is
    conditional there.
    """
    if not is_local(fs):
        yield
        return
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _commit(
    fs: Any,
    root: str,
    output: str,
    run: Mapping[str, Any],
    staged: Mapping[str, Sequence[str]],
    deleted_uris: pa.Array | None,
    replace: bool,
    expected_version: str | None | object,
) -> dict[str, Any]:
    run_id = str(run["run_id"])
    stage_root = join(root, STAGING_DIR, run_id)
    manifest_path = join(root, MANIFEST_NAME)
    if expected_version is UNCHECKED:
        expected_version = _version(fs, manifest_path)
    elif _version(fs, manifest_path) != expected_version:
        raise ConcurrentCommitError(
            f"another run committed to {output} while run {run_id} was running; nothing of "
            "this run was committed: run again to embed what is left"
        )
    if deleted_uris is not None and len(deleted_uris):
        from pipeline.write import DELETIONS_SCHEMA

        name = "deletions/part-0.parquet"
        make_parent(fs, join(stage_root, name))
        with fs.open(join(stage_root, name), "wb") as f:
            pq.write_table(pa.table([deleted_uris], schema=DELETIONS_SCHEMA), f)
        staged = dict(staged) | {"deletions": [name]}
    committed: dict[str, list[str]] = {}
    for table in TABLES:
        committed[table] = []
        for relative in sorted(staged.get(table, ())):
            name = relative.rsplit("/", 1)[-1]
            final = f"{table}/run_id={run_id}/{name}"
            make_parent(fs, join(root, final))
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
    superseded: list[str] = []
    for table in TABLES:
        previous = list(manifest["current"].get(table, []))
        if replace:
            superseded += previous
            previous = []
        manifest["current"][table] = sorted(previous + committed[table])
    for key in ("model", "preprocessing"):
        if key in run:
            manifest[key] = run[key]
    _write_atomically(
        fs, manifest_path, json.dumps(manifest, indent=2).encode(), expected_version, output
    )
    # Staging is scratch once the manifest is in place; leftovers of retried tasks go with it.
    remove_tree(fs, stage_root)
    for relative in superseded:
        remove_tree(fs, join(root, relative))
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


def manifest_version(
    output: str, *, storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """What changes whenever the manifest is rewritten (``None`` when there is none yet): its
    ETag on object stores; inode, size and mtime on local disk."""
    fs, root = open_fs(output, storage_options)
    return _version(fs, join(root, MANIFEST_NAME))


def _version(fs: Any, path: str) -> str | None:
    if is_local(fs):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    etag = info.get("ETag") or info.get("etag")
    return str(etag).strip('"') if etag else f"{info.get('size')}-{info.get('LastModified')}"


def _write_atomically(
    fs: Any, path: str, data: bytes, expected_version: str | None | object, output: str
) -> None:
    conflict = ConcurrentCommitError(
        f"another run committed to {output} at the same moment; this run's manifest was not "
        "written: run again to embed what is left"
    )
    if is_local(fs):
        # Write beside the target and rename: readers see the old manifest or the new one.
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if _version(fs, path) != expected_version:  # under _commit_lock: check-and-swap
            os.unlink(tmp)
            raise conflict
        os.replace(tmp, path)
        return
    # An object-store PUT is atomic (readers see the old manifest or the new one); on S3 it
    # is also conditional, so that two runs can never both think they committed.
    bucket, _, key = path.partition("/")
    try:
        if expected_version is None:
            fs.pipe_file(path, data, mode="create")  # If-None-Match: *
        elif hasattr(fs, "call_s3") and isinstance(expected_version, str):
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=expected_version)
        else:
            fs.pipe_file(path, data)
    except FileExistsError:
        raise conflict from None
    except OSError as exc:
        if _precondition_failed(exc):
            raise conflict from None
        raise
    finally:
        fs.invalidate_cache(path)


def _precondition_failed(exc: BaseException) -> bool:
    """s3fs turns S3's 412 PreconditionFailed into an OSError; the boto error is its cause."""
    cause = exc.__cause__ or exc.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause else None
    return code == "PreconditionFailed" or "pre-condition" in str(exc).lower()


class ConcurrentCommitError(PipelineError):
    """Another run committed to the same output while this one ran."""
