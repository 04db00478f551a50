"""Stage 5: the output, owned by one object. It opens the filesystem once, reads the manifest
once per run (a :class:`Snapshot`), holds a live run's lease, and cleans up what no manifest
lists. The commit is :mod:`pipeline.commit`; the readers are :mod:`pipeline.read`.

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
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pipeline.config import PipelineError
from pipeline.manifest import CHECKPOINTED, TABLES, Manifest, ManifestError, RunRecord
from pipeline.storage import is_local, is_passing, join, make_parent, one_line, open_fs, to_uri

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
                    version = local_version(os.fstat(f.fileno()))
                    data = f.read()
            except FileNotFoundError:
                return Snapshot(None, None)
        else:
            # Version first: a commit landing between the two reads makes this run's own
            # commit refuse (safe), never accept a manifest it did not read.
            version = self.version()
            if version is None:
                return Snapshot(None, None)
            try:
                data = self.fs.cat_file(self.manifest_path)
            except FileNotFoundError:
                return Snapshot(None, None)
        return Snapshot(parse_manifest(data, where=f"{self.uri}/{MANIFEST_NAME}"), version)

    def require(self, snapshot: Snapshot) -> Manifest:
        if snapshot.manifest is None:
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} under {self.given}: no run has committed there"
            )
        return snapshot.manifest

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
        with self.lock():
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
            self.remove(probe)

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
        self.remove(join(self.root, STAGING_DIR, run_id))
        staging = join(self.root, STAGING_DIR)
        if is_local(self.fs) and self.fs.exists(staging) and not self.fs.ls(staging):
            self.fs.rmdir(staging)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
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

    def version(self) -> str | None:
        """The manifest's current version (a stat or a HEAD: its content is not read)."""
        if is_local(self.fs):
            try:
                return local_version(os.stat(self.manifest_path))
            except FileNotFoundError:
                return None
        self.fs.invalidate_cache(self.manifest_path)
        try:
            info = self.fs.info(self.manifest_path)
        except FileNotFoundError:
            return None
        etag = info.get("ETag") or info.get("etag")
        return str(etag).strip('"') if etag else f"{info.get('size')}-{info.get('LastModified')}"

    def remove(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


def _run_folder(relative: str) -> str | None:
    """The run a path under the output belongs to: ``TABLE/run_id=RUN/…`` or
    ``_staging/RUN/…``."""
    parts = relative.split("/")
    if len(parts) > 2 and parts[1].startswith("run_id="):
        return parts[1][len("run_id=") :]
    if len(parts) > 2 and parts[0] == STAGING_DIR:
        return parts[1]
    return None  # a file directly under a table or _staging


def current_umask() -> int:
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


def local_version(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"
