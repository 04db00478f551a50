"""Stage 5: the output, owned by one object. It opens the filesystem once, reads the manifest once
per run (a :class:`Snapshot`), and commits: staged files move into the tables, then
``_manifest.json`` is written last, in one atomic, conditional write. A run exists for readers
only once its manifest does.

    OUTPUT/embeddings/run_id=…/part-….parquet
    OUTPUT/errors/run_id=…/part-….parquet
    OUTPUT/deletions/run_id=…/part-0.parquet
    OUTPUT/_manifest.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import PipelineError
from pipeline.manifest import CHECKPOINTED, TABLES, Manifest, ManifestError, RunRecord
from pipeline.storage import is_local, is_passing, join, make_parent, one_line, open_fs, to_uri

if TYPE_CHECKING:
    from pipeline.incremental import CommittedImages

MANIFEST_NAME = "_manifest.json"
LOCK_NAME = "_commit.lock"  # local disk only; pyarrow's dataset discovery skips "_" names
STAGING_DIR = "_staging"
REPORTS_DIR = "_reports"
# Written and deleted before a run: an unwritable output fails before any work is done.
WRITE_PROBE = "_write_probe"
# A live run's claim on the output, under its staging folder, renewed while it runs.
LEASE_NAME = "_lease.json"
LEASE_SECONDS = 120.0  # a lease not renewed for this long belongs to a dead run
# Waits between tries of the lease's first write while the store asks to slow down (~1 min).
LEASE_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

log = logging.getLogger(__name__)
LEASE_RENEW_SECONDS = 30.0
# The clean-up deletes only unlisted files older than this (Iceberg's remove_orphan_files
# older_than, Delta's VACUUM retention): a commit in flight on an object store, which copies
# its files before it writes the manifest, is never mistaken for litter.
CLEANUP_RETENTION_SECONDS = 3600.0


class RunningRunError(PipelineError):
    """Another run holds a live lease on the output."""


class ConcurrentCommitError(PipelineError):
    """Another run committed to the same output while this one ran."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The manifest as one read found it, and the version a commit must still find.

    ``version`` is ``None`` when no run has committed; otherwise the manifest's ETag on object
    stores, or its inode, size and mtime on local disk (a commit replaces the file, so the
    inode changes).
    """

    manifest: Manifest | None
    version: str | None

    @property
    def runs(self) -> Sequence[RunRecord]:
        return self.manifest.runs if self.manifest else ()


class Output:
    """An ``--output``: its filesystem and root, resolved once, and everything done to it.

    Args:
        uri: Local path, ``file://`` or any fsspec URL.
        storage_options: fsspec options for object stores.

    Example:
        >>> out = Output("/tmp/nowhere-yet")
        >>> out.snapshot().manifest is None
        True
    """

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = open_fs(uri, self.storage_options)
        self.given = uri  # as the user wrote it, for messages
        self.uri = to_uri(self.fs, self.root)
        self.manifest_path = join(self.root, MANIFEST_NAME)

    # -- reading ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Read the manifest, once, with the version a later commit compares against."""
        version: str | None
        if is_local(self.fs):
            try:
                with self.fs.open(self.manifest_path, "rb") as f:
                    # The version of exactly the bytes read: a commit replaces the file.
                    version = _local_version(os.fstat(f.fileno()))
                    data = f.read()
            except FileNotFoundError:
                return Snapshot(None, None)
        else:
            # Version first: a commit landing between the two reads makes this run's own
            # commit refuse (safe), never accept a manifest it did not read.
            version = self._version()
            if version is None:
                return Snapshot(None, None)
            try:
                data = self.fs.cat_file(self.manifest_path)
            except FileNotFoundError:
                return Snapshot(None, None)
        return Snapshot(parse_manifest(data, where=to_uri(self.fs, self.manifest_path)), version)

    def require(self, snapshot: Snapshot) -> Manifest:
        if snapshot.manifest is None:
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} under {self.given}: no run has committed there"
            )
        return snapshot.manifest

    def current(
        self,
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
            snapshot: From :meth:`snapshot`.
            embeddings: Columns of the embeddings table (``None``: all, with ``run_id``).
            errors: Columns of the errors table (``None``: all, with ``run_id``).
        """
        from pipeline.incremental import resolve_current

        manifest = self.require(snapshot)
        narrow = ["uri", "run_id"]
        emb = self._load(manifest, "embeddings", _with(embeddings, narrow))
        err = self._load(manifest, "errors", _with(errors, narrow))
        gone = self._load(manifest, "deletions", narrow)
        emb, err = resolve_current(emb, err, gone, order=manifest.commit_order())
        return (
            emb.select(list(embeddings)) if embeddings else emb,
            err.select(list(errors)) if errors else err,
        )

    def committed_images(self, snapshot: Snapshot, *, pending: bool = False) -> CommittedImages:
        """The current images' keys, indexed for a run's diff; the key columns are read once,
        as ``large_string``, and indexed where they lie (superseded rows are skipped, not
        copied out).

        Args:
            snapshot: From :meth:`snapshot`.
            pending: The pending files of a ``--full`` run instead (one resuming them).
        """
        from pipeline.incremental import (
            EMBEDDINGS_KEY_COLUMNS,
            ERRORS_KEY_COLUMNS,
            CommittedImages,
            resolve_rows,
        )

        manifest = self.require(snapshot)
        if pending:
            assert manifest.pending is not None
            manifest = Manifest(
                current=manifest.pending.files,
                runs=[],
                sequence={r: n for n, r in enumerate(manifest.pending.runs)},
            )
        narrow = ["uri", "run_id"]
        emb = self._load(manifest, "embeddings", [*EMBEDDINGS_KEY_COLUMNS, "run_id"], large=True)
        err = self._load(manifest, "errors", [*ERRORS_KEY_COLUMNS, "run_id"], large=True)
        gone = self._load(manifest, "deletions", narrow, large=True)
        rows = resolve_rows(emb, err, gone, order=manifest.commit_order())
        return CommittedImages(emb, err, rows, refused=manifest.refused)

    def superseded(self, snapshot: Snapshot) -> pa.Table:
        """``(uri, run_id)`` of the rows in current embeddings files that are not current: the
        image changed in a later run, is gone, or was listed twice."""
        from pipeline.incremental import resolve_rows

        manifest = self.require(snapshot)
        narrow = ["uri", "run_id"]
        emb = self._load(manifest, "embeddings", narrow, large=True)
        if emb.num_rows == 0:
            return pa.table({c: pa.array([], pa.string()) for c in narrow})
        err = self._load(manifest, "errors", narrow, large=True)
        gone = self._load(manifest, "deletions", narrow, large=True)
        current, _ = resolve_rows(emb, err, gone, order=manifest.commit_order())
        stale = np.ones(emb.num_rows, dtype=bool)
        stale[current] = False
        return pa.table({c: emb[c].filter(pa.array(stale)).cast(pa.string()) for c in narrow})

    def iter_current(
        self, snapshot: Snapshot, *, columns: Sequence[str], batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        """Stream the current embeddings in record batches (see :func:`iter_embeddings`)."""
        from pipeline.incremental import KeyIndex

        manifest = self.require(snapshot)
        files = [join(self.root, p) for p in manifest.current.get("embeddings", [])]
        if not files:
            return
        current, _ = self.current(snapshot, embeddings=["uri", "run_id"], errors=["uri"])
        # Each batch is looked up in one index of the current (uri, run_id) keys, built once.
        index = KeyIndex(current, ["uri", "run_id"])
        dataset = self._dataset("embeddings", files)
        wanted = list(dict.fromkeys([*columns, "uri", "run_id"]))
        for batch in dataset.to_batches(columns=wanted, batch_size=batch_size):
            kept = batch.filter(pa.array(index.find(pa.Table.from_batches([batch])) >= 0))
            if kept.num_rows:
                yield kept.select(list(columns))

    def _load(
        self, manifest: Manifest, table: str, columns: list[str] | None, *, large: bool = False
    ) -> pa.Table:
        from pipeline.write import DELETIONS_SCHEMA, EMBEDDINGS_SCHEMA, ERRORS_SCHEMA

        files = [join(self.root, p) for p in manifest.current.get(table, [])]
        if not files:
            schema = {"embeddings": EMBEDDINGS_SCHEMA, "errors": ERRORS_SCHEMA}.get(
                table, DELETIONS_SCHEMA
            )
            empty = schema.append(pa.field("run_id", pa.string())).empty_table()
            return empty.select(columns) if columns else empty
        return self._dataset(table, files, large=large).to_table(columns=columns)

    def _dataset(self, table: str, files: list[str], *, large: bool = False) -> pads.Dataset:
        """The listed files of one table, with ``run_id`` (always a string) from their folders;
        ``large``: string columns read as ``large_string``."""
        options: dict[str, Any] = {
            "filesystem": self.fs,
            "format": "parquet",
            "partitioning": pads.partitioning(pa.schema([("run_id", pa.string())]), flavor="hive"),
            "partition_base_dir": join(self.root, table),
        }
        dataset = pads.dataset(files, **options)
        if not large:
            return dataset
        schema = pa.schema(
            [
                field.with_type(pa.large_string()) if field.type == pa.string() else field
                for field in dataset.schema
            ]
        )
        return pads.dataset(files, schema=schema, **options)

    # -- before a run -----------------------------------------------------------------------

    def check_writable(self) -> None:
        """Write and delete a probe, so an unwritable output fails before any work is done."""
        probe = join(self.root, WRITE_PROBE)
        try:
            if is_local(self.fs):
                self.fs.makedirs(self.root, exist_ok=True)
            # On object stores no makedirs: s3fs would create a missing bucket.
            self.fs.pipe_file(probe, b"")
            self.fs.rm(probe)
        except (OSError, PermissionError) as exc:
            raise PipelineError(f"cannot write to output {self.uri}: {one_line(exc)}") from None

    def remove_orphans(self, *, retention: float = CLEANUP_RETENTION_SECONDS) -> int:
        """Delete files no manifest lists that are older than ``retention`` seconds, outside
        the folders of live runs; returns how many were removed.

        What a killed run left (staged files, files moved before its manifest was written,
        files superseded by a commit killed before it deleted them) goes this way. The rule,
        as Iceberg's ``remove_orphan_files(older_than=…)`` and Delta's ``VACUUM`` apply it:
        the decision is taken against a fresh read of the manifest (under ``_commit.lock`` on
        local disk, where commits hold it too), never on a file that manifest lists, never
        on a file younger than the retention (a commit in flight on an object store copies
        its files before it writes its manifest), and never under the staging or table
        folders of a run whose lease is alive.
        """
        with self._lock():
            manifest = self.snapshot().manifest or Manifest.empty()
            listed = manifest.listed_paths()
            live = set(self.live_leases())
            cutoff = self._store_now() - retention
            prefix = join(self.root, "")
            doomed: list[str] = []

            def sweep(files: Mapping[str, Mapping[str, Any]]) -> None:
                for path, info in files.items():
                    relative = path[len(prefix) :]
                    if (
                        relative in listed
                        or _run_folder(relative) in live
                        or _mtime(info) >= cutoff
                    ):
                        continue
                    doomed.append(path)

            # Only the folders that can hold leftovers are listed file by file: a run's with
            # no listed file (never committed, or superseded), or a run the log shows
            # unsettled (killed between checkpoints or in its last commit). A settled run's
            # folder holds only what the manifest lists; listing it would cost a LIST request
            # per 1,000 files of the table at every start.
            listed_runs = {_run_folder(path) for path in listed}
            unsettled = {r.run_id for r in manifest.runs if r.status == CHECKPOINTED}
            for table in TABLES:
                for entry in self._entries(join(self.root, table)):
                    # Only run folders: nothing else under a table is this program's to delete.
                    run = _run_folder(entry["name"][len(prefix) :] + "/")
                    if entry.get("type") != "directory" or run is None or run in live:
                        continue
                    if run not in listed_runs or run in unsettled:
                        sweep(self._files(entry["name"]))
            sweep(self._files(join(self.root, STAGING_DIR)))
            for entry in self._entries(self.root):
                name = entry["name"].rsplit("/", 1)[-1]
                if name.startswith(".manifest-") and _mtime(entry) < cutoff:
                    doomed.append(entry["name"])
            if doomed:
                self.fs.rm(doomed)  # S3: DeleteObjects, a thousand keys a request
            if is_local(self.fs):
                # The folders emptied here, then _staging itself if empty; a folder a run has
                # just made for its lease has had nothing deleted from it, and stays.
                emptied = {join(self.root, STAGING_DIR)}
                for path in doomed:
                    folder = os.path.dirname(path)
                    while len(folder) > len(self.root) + 1 and folder not in emptied:
                        emptied.add(folder)
                        folder = os.path.dirname(folder)
                emptied -= {join(self.root, table) for table in TABLES}
                for folder in sorted(emptied, key=len, reverse=True):
                    with contextlib.suppress(OSError):  # not empty, or gone: kept
                        os.rmdir(folder)
        return len(doomed)

    def _files(self, path: str) -> dict[str, dict[str, Any]]:
        self.fs.invalidate_cache(path)
        try:
            found: dict[str, dict[str, Any]] = self.fs.find(path, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        return found

    def _folders(self, path: str) -> list[str]:
        return [e["name"] for e in self._entries(path) if e.get("type") == "directory"]

    def _entries(self, path: str) -> list[dict[str, Any]]:
        self.fs.invalidate_cache(path)
        try:
            return list(self.fs.ls(path, detail=True))
        except FileNotFoundError:
            return []

    def _store_now(self) -> float:
        """Now, by the clock that stamps the store's files (an object store's, not this
        host's: drivers' clocks may disagree)."""
        if is_local(self.fs):
            return time.time()
        probe = join(self.root, STAGING_DIR, f"_clock-{os.getpid()}-{threading.get_ident()}")
        self.fs.pipe_file(probe, b"")
        try:
            return _mtime(self.fs.info(probe))
        finally:
            self._remove(probe)

    # -- leases: which runs are alive ---------------------------------------------------------

    def live_leases(self) -> dict[str, dict[str, Any]]:
        """The runs whose lease is alive: renewed within ``LEASE_SECONDS`` by the store's
        clock, and (on this host) held by a process that still exists."""
        found: dict[str, dict[str, Any]] = {}
        now: float | None = None
        for folder in self._folders(join(self.root, STAGING_DIR)):
            path = join(folder, LEASE_NAME)
            try:
                info = self.fs.info(path)
                lease = json.loads(self.fs.cat_file(path))
            except (FileNotFoundError, ValueError):
                continue
            now = now if now is not None else self._store_now()
            if now - _mtime(info) > LEASE_SECONDS or not _process_may_live(lease):
                continue
            found[folder.rsplit("/", 1)[-1]] = dict(lease) | {"renewed": _mtime(info)}
        return found

    @contextlib.contextmanager
    def lease(self, run_id: str, *, what: str = "run") -> Iterator[None]:
        """Hold this output for ``run_id`` while the block runs: refuse, in one line, if
        another run is alive here; renew the lease in a thread; on the way out, by success,
        error or stop signal, delete the run's staging folder and its lease.

        Two runs that start at the same moment both write their lease, then both look: the
        one whose lease sorts first goes on, the other is refused.
        """
        lease = {
            "run_id": run_id,
            "what": what,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": time.time(),
        }
        path = join(self.root, STAGING_DIR, run_id, LEASE_NAME)
        for attempt, pause in enumerate((*LEASE_BACKOFF_SECONDS, None)):
            try:
                make_parent(self.fs, path)
                self.fs.pipe_file(path, json.dumps(lease).encode())
                break
            except FileNotFoundError:  # a clean-up removed the empty folder meanwhile
                if attempt == 2:
                    raise
            except OSError as exc:  # a store that asks to slow down gets time, then a retry
                if pause is None or not is_passing(exc):
                    raise
                time.sleep(pause)
        try:
            rivals = [
                other
                for other_id, other in self.live_leases().items()
                if other_id != run_id
                and (other.get("created", 0), other_id) <= (lease["created"], run_id)
            ]
            if rivals:
                other = rivals[0]
                raise RunningRunError(
                    f"{other.get('what', 'run')} {other.get('run_id')} (host "
                    f"{other.get('host')}, pid {other.get('pid')}) is writing to {self.given}; "
                    f"nothing was done: run again once it has finished (a dead run's lease "
                    f"lapses {LEASE_SECONDS:.0f} s after its last renewal)"
                )
            stop = threading.Event()

            def renew() -> None:
                while not stop.wait(LEASE_RENEW_SECONDS):
                    with contextlib.suppress(OSError):
                        self.fs.pipe_file(path, json.dumps(lease).encode())

            renewer = threading.Thread(target=renew, name=f"lease-{run_id}", daemon=True)
            renewer.start()
            try:
                yield
            finally:
                stop.set()
        finally:
            # Best effort: a store that fails here must not hide how the run ended. What
            # stays is removed by a later run's clean-up, and the lease lapses by itself.
            try:
                self.discard_staging(run_id)
            except OSError as exc:
                log.warning(
                    "could not remove %s's staging (%s); a later run's clean-up removes it",
                    run_id,
                    one_line(exc),
                )

    def staging_uri(self, run_id: str) -> str:
        """Where a run's writer tasks put their files (a URI the tasks can open)."""
        return join(self.uri, STAGING_DIR, run_id)

    # -- the commit -------------------------------------------------------------------------

    def commit(
        self,
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
        with self._lock():
            if self._version() != snapshot.version:
                raise ConcurrentCommitError(
                    f"another run committed to {self.given} while run {run.run_id} was "
                    "running; nothing of this run was committed: run again to embed what is left"
                )
            stage_root = join(self.root, STAGING_DIR, run.run_id)
            if deleted_uris is not None and len(deleted_uris):
                from pipeline.write import DELETIONS_SCHEMA

                name = "deletions/part-0.parquet"
                make_parent(self.fs, join(stage_root, name))
                # One string chunk per million URIs: a chunk's offsets stay under 2 GiB.
                uris = pa.chunked_array(
                    [
                        deleted_uris.slice(i, 1 << 20).cast(pa.string())
                        for i in range(0, len(deleted_uris), 1 << 20)
                    ],
                    pa.string(),
                )
                with self.fs.open(join(stage_root, name), "wb") as f:
                    pq.write_table(pa.table([uris], schema=DELETIONS_SCHEMA), f)
                staged = dict(staged) | {"deletions": [name]}
            committed = self._move_staged(stage_root, run.run_id, staged)
            before = snapshot.manifest or Manifest.empty()
            manifest, superseded = before.with_run(
                dataclasses.replace(run, files=committed), replace=replace, pending=pending
            )
            if verdict is not None:
                accepted, complete = verdict
                manifest = manifest.with_verdict(run.run_id, accepted=accepted, complete=complete)
            version = self._write_manifest(manifest.to_bytes(), snapshot.version)
        if final:
            # Staging is scratch once the manifest is in place; leftovers of retried tasks too.
            self.discard_staging(run.run_id)
            for relative in superseded:
                self._remove(join(self.root, relative))
        return Snapshot(manifest, version)

    def _move_staged(
        self, stage_root: str, run_id: str, staged: Mapping[str, Sequence[str]]
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
                targets.append(join(self.root, final))
                committed[table].append(final)
        if not sources:
            return committed
        if is_local(self.fs):
            for source, target in zip(sources, targets, strict=True):
                make_parent(self.fs, target)
                self.fs.mv(source, target)
        elif hasattr(self.fs, "_copy_basic") and getattr(self.fs, "loop", None) is not None:
            _copy_together(self.fs, sources, targets)
        else:
            self.fs.copy(sources, targets)
        return committed

    def write_report(self, run_id: str, report: Mapping[str, Any], html: str) -> str:
        """Write ``_reports/RUN_ID.json`` and ``.html`` (not part of the commit: a reader
        never needs them); returns the HTML's URI."""
        path = join(self.root, REPORTS_DIR, run_id)
        make_parent(self.fs, path)
        self.fs.pipe_file(path + ".json", json.dumps(report, indent=2).encode())
        self.fs.pipe_file(path + ".html", html.encode())
        return self.report_uri(run_id)

    def report_uri(self, run_id: str) -> str:
        return join(self.uri, REPORTS_DIR, run_id + ".html")

    def discard_staging(self, run_id: str) -> None:
        """Delete a run's staging folder (and ``_staging`` itself once it is empty)."""
        self._remove(join(self.root, STAGING_DIR, run_id))
        staging = join(self.root, STAGING_DIR)
        if is_local(self.fs) and self.fs.exists(staging) and not self.fs.ls(staging):
            self.fs.rmdir(staging)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """On local disk, one commit at a time per output: check, moves and manifest together.

        An exclusive ``flock`` on ``_commit.lock``, which the kernel releases when its holder
        dies, so a killed run leaves no stale lock. Object stores need none: the manifest PUT
        itself is conditional there.
        """
        if not is_local(self.fs):
            yield
            return
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _version(self) -> str | None:
        """The manifest's current version (a stat or a HEAD: its content is not read)."""
        if is_local(self.fs):
            try:
                return _local_version(os.stat(self.manifest_path))
            except FileNotFoundError:
                return None
        self.fs.invalidate_cache(self.manifest_path)
        try:
            info = self.fs.info(self.manifest_path)
        except FileNotFoundError:
            return None
        etag = info.get("ETag") or info.get("etag")
        return str(etag).strip('"') if etag else f"{info.get('size')}-{info.get('LastModified')}"

    def _write_manifest(self, data: bytes, expected_version: str | None) -> str:
        """Write the manifest if its version is still ``expected_version``; its new version."""
        conflict = ConcurrentCommitError(
            f"another run committed to {self.given} at the same moment; this run's manifest "
            "was not written: run again to embed what is left"
        )
        path = self.manifest_path
        if is_local(self.fs):
            # Write beside the target and rename: readers see the old manifest or the new one.
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=directory)
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; the tables follow the umask
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if self._version() != expected_version:  # under _lock: check-and-swap
                os.unlink(tmp)
                raise conflict
            version = _local_version(os.stat(tmp))  # a rename keeps inode, size and mtime
            os.replace(tmp, path)
            return version
        # An object-store PUT is atomic (readers see the old manifest or the new one); on S3
        # it is also conditional, so that two runs can never both think they committed.
        bucket, _, key = path.partition("/")
        try:
            if expected_version is None:
                written = self.fs.pipe_file(path, data, mode="create")  # If-None-Match: *
            elif hasattr(self.fs, "call_s3"):
                written = self.fs.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=data, IfMatch=expected_version
                )
            else:
                written = self.fs.pipe_file(path, data)
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
            self.fs.invalidate_cache(path)
        after = self._version()  # a store that returns no ETag
        assert after is not None
        return after

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


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


def _run_folder(relative: str) -> str | None:
    """The run a path under the output belongs to: ``TABLE/run_id=RUN/…`` or
    ``_staging/RUN/…``."""
    parts = relative.split("/")
    if len(parts) > 2 and parts[1].startswith("run_id="):
        return parts[1][len("run_id=") :]
    if len(parts) > 2 and parts[0] == STAGING_DIR:
        return parts[1]
    return None  # a file directly under a table or _staging


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` would, for every thread)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mtime(info: Mapping[str, Any]) -> float:
    """A listed file's modification time in seconds (local ``mtime``, S3 ``LastModified``)."""
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if value is None:
        return time.time()  # unknown: as young as can be, so never deleted for its age
    return float(value)


def _process_may_live(lease: Mapping[str, Any]) -> bool:
    """False only for a lease of this host whose process is gone."""
    if lease.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(lease.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def parse_manifest(data: bytes, *, where: str) -> Manifest:
    """The manifest in ``data``; one line (:class:`ManifestError`) when it is not JSON."""
    try:
        decoded = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(
            f"{where} is not valid JSON ({exc}): a corrupt or foreign file"
        ) from None
    return Manifest.from_json(decoded, where=where)


def _local_version(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def _with(columns: Sequence[str] | None, required: list[str]) -> list[str] | None:
    if columns is None:
        return None
    return list(columns) + [c for c in required if c not in columns]


def _precondition_failed(exc: BaseException) -> bool:
    """s3fs turns S3's 412 PreconditionFailed into an OSError; the boto error is its cause."""
    cause = exc.__cause__ or exc.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause else None
    return code == "PreconditionFailed" or "pre-condition" in str(exc).lower()


# -- the readers' API: each call reads the manifest once -------------------------------------


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
        return out.current(out.snapshot(), embeddings=columns, errors=narrow)[0]
    return out.current(out.snapshot(), embeddings=narrow, errors=columns)[1]


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
    yield from out.iter_current(out.snapshot(), columns=columns, batch_size=batch_size)


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
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.data.datasource import Partitioning

    out = Output(output, storage_options)
    snapshot = out.snapshot()
    manifest = out.require(snapshot)
    files = [join(out.root, p) for p in manifest.current.get("embeddings", [])]
    wanted = list(columns) if columns else None
    if not files:
        raise FileNotFoundError(f"{out.uri} holds no embeddings")
    superseded = out.superseded(snapshot)
    dataset = ray.data.read_parquet(
        files,
        filesystem=None if is_local(out.fs) else PyFileSystem(FSSpecHandler(out.fs)),
        partitioning=Partitioning(
            "hive",  # type: ignore[arg-type]
            base_dir=join(out.root, "embeddings"),
            field_types={"run_id": str},
        ),
        columns=_with(wanted, ["uri", "run_id"]) if superseded.num_rows and wanted else wanted,
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
    from pipeline.incremental import KeyIndex

    keys = pa.table({c: batch[c].cast(pa.string()) for c in ("uri", "run_id")})
    kept = batch.filter(pa.array(KeyIndex(superseded, ["uri", "run_id"]).find(keys) < 0))
    return kept.select(columns) if columns else kept
