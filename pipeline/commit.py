"""The commit: a run's staged files move into the tables, then ``_manifest.json`` is written
last, in one atomic, conditional write. A run exists for readers only once its manifest does.

On local disk the whole commit (check, moves, manifest) holds the output's ``_commit.lock``;
on S3 the manifest PUT is conditional (``If-None-Match: *`` for the first run, ``If-Match:
ETAG`` after), so two runs can never both think they committed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import TABLES, Manifest, RunRecord
from pipeline.output import (
    STAGING_DIR,
    ConcurrentCommitError,
    Output,
    Snapshot,
    current_umask,
    local_version,
)
from pipeline.storage import is_local, join, make_parent
from pipeline.write import DELETIONS_SCHEMA


def commit_run(
    output: Output,
    snapshot: Snapshot,
    run: RunRecord,
    *,
    staged: Mapping[str, Sequence[str]],
    deleted_uris: pa.Array | None = None,
    replace: bool = False,
    pending: bool = False,
    final: bool = True,
    verdict: tuple[bool, bool] | None = None,
) -> Snapshot:
    """Move a run's staged files into the tables and write the manifest, last.

    Args:
        snapshot: What this run read before it started. If another run has committed
            since, nothing is moved or written and :class:`ConcurrentCommitError` is
            raised. On S3 the manifest PUT itself is conditional (``If-None-Match: *`` for
            the first run, ``If-Match: ETAG`` after); on local disk the whole commit
            (check, moves, manifest) holds ``_commit.lock``. The snapshot's manifest is
            the one this commit extends: it is not read again.
        run: The run's record; its ``files`` are filled in here.
        staged: Per table, file paths relative to the run's staging folder
            (``embeddings/part-….parquet``), exactly those the writer tasks returned.
        deleted_uris: URIs this run found gone from the input, recorded in ``deletions/``.
        replace: This run re-embedded everything (``--full``): its files (and the pending
            ones it resumed) become the table, with its model; earlier files stop being
            current, and are deleted once the new manifest is in place.
        pending: A checkpoint of a run that will replace the table: its files are
            committed as pending, not current (:meth:`Manifest.with_run`).
        final: The run's last commit; otherwise a checkpoint (its writers go on writing
            into staging, which is kept).
        verdict: ``(accepted, complete)``: the run's verdict on its failures
            (:meth:`Manifest.with_verdict`); ``None`` leaves the refused runs as they are.

    Returns:
        The manifest as written, with its version: what the run's next commit must find.
    """
    with output.lock():
        if output.version() != snapshot.version:
            raise ConcurrentCommitError(
                f"another run committed to {output.given} while run {run.run_id} was "
                "running; nothing of this run was committed: run again to embed what is left"
            )
        stage_root = join(output.root, STAGING_DIR, run.run_id)
        if deleted_uris is not None and len(deleted_uris):
            name = "deletions/part-0.parquet"
            make_parent(output.fs, join(stage_root, name))
            # One string chunk per million URIs: a chunk's offsets stay under 2 GiB.
            uris = pa.chunked_array(
                [
                    deleted_uris.slice(i, 1 << 20).cast(pa.string())
                    for i in range(0, len(deleted_uris), 1 << 20)
                ],
                pa.string(),
            )
            with output.fs.open(join(stage_root, name), "wb") as f:
                pq.write_table(pa.table([uris], schema=DELETIONS_SCHEMA), f)
            staged = dict(staged) | {"deletions": [name]}
        committed = _move_staged(output, stage_root, run.run_id, staged)
        before = snapshot.manifest or Manifest.empty()
        manifest, superseded = before.with_run(
            dataclasses.replace(run, files=committed), replace=replace, pending=pending
        )
        if verdict is not None:
            accepted, complete = verdict
            manifest = manifest.with_verdict(run.run_id, accepted=accepted, complete=complete)
        version = write_manifest(output, manifest.to_bytes(), snapshot.version)
    if final:
        # Staging is scratch once the manifest is in place; leftovers of retried tasks too.
        output.discard_staging(run.run_id)
        for relative in superseded:
            output.remove(join(output.root, relative))
    return Snapshot(manifest, version)


def _move_staged(
    output: Output, stage_root: str, run_id: str, staged: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Move staged files to ``TABLE/run_id=RUN_ID/``; their paths there, per table.

    On local disk a rename each. On object stores, where a move is a copy and a delete,
    the copies go out together (fsspec's batched async copy) and the staged files are
    deleted with the staging folder, after the manifest.
    """
    committed: dict[str, list[str]] = {table: [] for table in TABLES}
    sources, targets = [], []
    for table in TABLES:
        for relative in sorted(staged.get(table, ())):
            final = f"{table}/run_id={run_id}/{relative.rsplit('/', 1)[-1]}"
            sources.append(join(stage_root, relative))
            targets.append(join(output.root, final))
            committed[table].append(final)
    if not sources:
        return committed
    if is_local(output.fs):
        for source, target in zip(sources, targets, strict=True):
            make_parent(output.fs, target)
            output.fs.mv(source, target)
    elif hasattr(output.fs, "_copy_basic") and getattr(output.fs, "loop", None) is not None:
        _copy_together(output.fs, sources, targets)
    else:
        output.fs.copy(sources, targets)
    return committed


def write_manifest(output: Output, data: bytes, expected_version: str | None) -> str:
    """Write the manifest if its version is still ``expected_version``; its new version."""
    conflict = ConcurrentCommitError(
        f"another run committed to {output.given} at the same moment; this run's manifest "
        "was not written: run again to embed what is left"
    )
    path = output.manifest_path
    if is_local(output.fs):
        # Write beside the target and rename: readers see the old manifest or the new one.
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=directory)
        os.fchmod(
            fd, 0o666 & ~current_umask()
        )  # mkstemp makes it 0600; the tables follow the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if output.version() != expected_version:  # under _lock: check-and-swap
            os.unlink(tmp)
            raise conflict
        version = local_version(os.stat(tmp))  # a rename keeps inode, size and mtime
        os.replace(tmp, path)
        return version
    # An object-store PUT is atomic (readers see the old manifest or the new one); on S3
    # it is also conditional, so that two runs can never both think they committed.
    bucket, _, key = path.partition("/")
    try:
        if expected_version is None:
            written = output.fs.pipe_file(path, data, mode="create")  # If-None-Match: *
        elif hasattr(output.fs, "call_s3"):
            written = output.fs.call_s3(
                "put_object", Bucket=bucket, Key=key, Body=data, IfMatch=expected_version
            )
        else:
            written = output.fs.pipe_file(path, data)
        # The version this PUT made (its ETag), not one read after it: another run's
        # commit may land in between.
        etag = written.get("ETag") if isinstance(written, dict) else None
        if etag:
            return str(etag).strip('"')
    except FileExistsError:
        raise conflict from None
    except OSError as exc:
        if _precondition_failed(exc):
            raise conflict from None
        raise
    finally:
        output.fs.invalidate_cache(path)
    after = output.version()  # a store that returns no ETag
    assert after is not None
    return after


# Server-side copies in flight at once during a commit on S3.
COPY_CONCURRENCY = 64


def _copy_together(fs: Any, sources: Sequence[str], targets: Sequence[str]) -> None:
    """S3 server-side copies (one CopyObject each: staged files are far below its 5 GB
    limit), ``COPY_CONCURRENCY`` at a time on s3fs's event loop."""
    import asyncio

    from fsspec.asyn import sync

    async def copy_all() -> None:
        slots = asyncio.Semaphore(COPY_CONCURRENCY)

        async def copy(source: str, target: str) -> None:
            async with slots:
                await fs._copy_basic(source, target)

        await asyncio.gather(*(copy(s, t) for s, t in zip(sources, targets, strict=True)))

    sync(fs.loop, copy_all)


def _precondition_failed(exc: BaseException) -> bool:
    """s3fs turns S3's 412 PreconditionFailed into an OSError; the boto error is its cause."""
    cause = exc.__cause__ or exc.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause else None
    return code == "PreconditionFailed" or "pre-condition" in str(exc).lower()
