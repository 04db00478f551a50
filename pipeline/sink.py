"""Stage 5 in the driver: the run's books, and its commits as the writer tasks finish.

    start            (driver) delete what runs that never committed left behind
    write_files      (tasks)  :mod:`pipeline.write`: files into OUTPUT/_staging/RUN_ID/
    consume          (driver) each writer task's files as it finishes; every ``--commit-every``
                              images (or ``--commit-interval`` seconds) a checkpoint commit;
                              at the end: every image once? error rate? the last commit;
                              on SIGTERM (:mod:`pipeline.stop`) a checkpoint per task
                              finished in the drain, then a stop

Writer tasks are map tasks to Ray Data, so they are retried on the errors named in
``DataContext.retried_map_errors``, like the decode tasks. A retried task's files get new
names and only the names the driver receives are committed. A checkpoint is a commit like
the last one (files moved, the manifest written last and conditionally), recording the run
as ``checkpointed``: a run killed between checkpoints keeps every checkpoint, and the next
run's diff finds those images committed and embeds only the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pipeline.commit import commit_run
from pipeline.config import EmbedConfig, PipelineError
from pipeline.embed import ModelIdentity
from pipeline.failures import Failures, count_failures, describe_failures, merge_failures
from pipeline.incremental import NewImages
from pipeline.manifest import (
    CHECKPOINTED,
    COMMITTED,
    ERROR_RATE_EXCEEDED,
    RunCounts,
    RunRecord,
    RunStatus,
    utc_iso,
)
from pipeline.output import Output
from pipeline.probe import TOLERANCES, ProbeResult, describe_probe, probe_verdict
from pipeline.quality import merge_quality, summary
from pipeline.stop import Drain, Stopped
from pipeline.write import Staged, file_metadata

if TYPE_CHECKING:
    from pipeline.checks import Run

logger = logging.getLogger(__name__)


def error_rate_verdict(
    failures: Mapping[str, Failures],
    *,
    unaccepted: Mapping[str, Failures],
    to_embed: int,
    max_error_rate: float,
) -> str | None:
    """The verdict rule of ``--max-error-rate``; ``None`` when the run passes, else the line
    that says why not.

    A run's failures plus the failures earlier runs' verdicts refused (still current, not
    fixed), over the run's images plus those. Failures an earlier run accepted never count
    again. It is applied once, to the run's totals, so neither checkpoints nor the listing
    order can change it.

    Example:
        >>> error_rate_verdict({}, unaccepted={}, to_embed=0, max_error_rate=0.1) is None
        True
    """
    earlier = count_failures(unaccepted)
    failed = count_failures(failures) + earlier
    attempted = to_embed + earlier
    rate = failed / attempted if attempted else 0.0
    if rate <= max_error_rate:
        return None
    earlier_text = f", {earlier} of them refused in earlier runs" if earlier else ""
    kinds = describe_failures(merge_failures(failures, unaccepted))
    return (
        f"{failed} of {attempted} images failed ({rate:.1%}: {kinds}{earlier_text}), above "
        f"--max-error-rate {max_error_rate:.1%}"
    )


class QualityGateError(PipelineError):
    """The gate refused vectors a writer returned (:mod:`pipeline.quality`)."""


class ErrorRateExceededError(PipelineError):
    """More images failed than ``--max-error-rate`` allows.

    Attributes:
        record: The run as recorded (only its errors committed), when it ran at all.
    """

    def __init__(self, message: str, record: RunRecord | None = None) -> None:
        super().__init__(message)
        self.record = record


@dataclasses.dataclass(frozen=True)
class RunBooks:
    """What the driver knows of a run before it executes, and settles at its commits.

    ``listing`` holds the books on every listed image (unchanged, known failed, gone); its
    chunks' references stay in the driver with it. ``model`` and ``preprocessing`` are the
    run's, or the table's for a run that adds no vector.
    """

    run: Run
    model: ModelIdentity
    preprocessing: Mapping[str, Any]
    listing: NewImages

    @property
    def config(self) -> EmbedConfig:
        return self.run.config

    @property
    def output(self) -> Output:
        return self.run.output

    @property
    def replace(self) -> bool:
        """A complete ``--full`` run: earlier files stop being current."""
        return self.config.full and self.config.limit is None

    @property
    def known_failed(self) -> int:
        return self.listing.known_failed

    @property
    def to_embed(self) -> int:
        return self.listing.to_embed

    @property
    def complete(self) -> bool:
        """The run saw every image of its input (no ``--limit``, listing not cut short)."""
        return self.config.limit is None and self.listing.complete

    def error_rate_exceeded(self, failures: Mapping[str, Failures]) -> str | None:
        """What is wrong when this run's totals exceed ``--max-error-rate``
        (:func:`error_rate_verdict`); ``failures``: this run's, by type (none before the run
        executes: then the best case is checked)."""
        return error_rate_verdict(
            failures,
            unaccepted=self.listing.unaccepted_failures,
            to_embed=self.to_embed,
            max_error_rate=self.config.max_error_rate,
        )

    def refuse_known_failures(self) -> None:
        """Raise when earlier runs' refused failures alone exceed ``--max-error-rate``:
        embedding the rest could not pass, so nothing is embedded."""
        known_bad = self.error_rate_exceeded({})
        if known_bad:
            raise ErrorRateExceededError(
                f"{known_bad}: nothing embedded; fix or remove those images (see "
                f"{self.output.uri}/errors), or raise --max-error-rate"
            )

    def record(
        self,
        *,
        status: RunStatus,
        embedded: int,
        failed: int,
        failures: Mapping[str, Failures],
        executing_since: float | None,
        checkpoints: int,
        final: bool,
        quality: Mapping[str, Any] | None = None,
        reused: int = 0,
    ) -> RunRecord:
        """The run's record as of a commit (``final``: its last)."""
        from pipeline import __version__

        now = time.time()
        wall = now - self.run.started
        embedding = now - executing_since if executing_since else 0.0
        listing = self.listing
        return RunRecord(
            run_id=self.run.run_id,
            status=status,
            input=self.run.input.uri,
            full=self.config.full,
            started_at=self.run.started_at,
            finished_at=utc_iso(),
            wall_seconds=round(wall, 3),
            images_per_second=round(embedded / wall if wall > 0 else 0.0, 3),
            embedding_images_per_second=round(embedded / embedding if embedding > 0 else 0.0, 3),
            failures=dict(failures),
            known_failures=dict(listing.known_failures) if final else {},
            counts=RunCounts(
                listed=listing.counts.listed if final else 0,
                skipped_by_extension=listing.counts.skipped_by_extension if final else 0,
                unchanged=listing.unchanged if final else 0,
                known_failed=self.known_failed if final else 0,
                duplicates=listing.counts.duplicates if final else 0,
                embedded=embedded,
                reused=reused,
                failed=failed,
                deleted=len(listing.deleted) if final and status == COMMITTED else 0,
            ),
            pipeline_version=__version__,
            model=self.model,
            preprocessing=self.preprocessing,
            checkpoints=checkpoints,
            quality=dict(quality or {}),
        )


class RunSink:
    """One run's writes and commits: the writer stage's arguments, and the driver's loop over
    what the writers return (:meth:`consume`).

    Ray Data bundles model batches into ``--rows-per-file`` rows per writer task, and the task
    writes them as one file.

    Args:
        books: The run's books; they stay in the driver (writer tasks get only what they
            write with: the staging URI, storage options and file metadata).
    """

    def __init__(self, books: RunBooks, drain: Drain | None = None) -> None:
        self.books = books
        self.drain = drain or Drain(0)  # set by a SIGTERM's handler while the run executes
        # Ends a streamed listing's feed early (a drain); None: the listing is in the driver.
        self.stop_feeding: Callable[[], None] | None = None
        # The driver's loop and the drain's thread both commit: one at a time.
        self.lock = threading.RLock()
        assert books.run.snapshot is not None
        self.snapshot = books.run.snapshot  # the version the next commit must find
        self.record: RunRecord | None = None
        # A listing that streams while the run executes: its books, once it is done.
        self.listing_done: Callable[[], NewImages] | None = None
        self.executing_since: float | None = None  # set by the plan when execution starts
        # For the run report: seconds per phase, and (seconds since start, images) per task.
        self.timings: dict[str, float] = {}
        self.written: list[tuple[float, int]] = []
        self.rows_written = 0  # images written so far, embedded or failed
        # Committed by checkpoints so far, and staged since the last commit.
        self.checkpoints = 0
        self.committed_rows = {"embeddings": 0, "errors": 0}
        self.failures: dict[str, Failures] = {}
        self.quality = merge_quality([])  # of the vectors committed so far
        self.reused = 0  # of the images committed so far, those copied by content
        # The probe (pipeline.probe): its rows fed, their results back, and its verdict once
        # all are back; nothing is committed before.
        self.probes_expected = 0
        self.probe_results: list[ProbeResult] = []
        self.probe_verdict: dict[str, Any] = {}
        self.pending: list[Staged] = []
        self.last_commit = time.time()

    def writer_kwargs(self) -> dict[str, Any]:
        """:func:`write_files`'s keyword arguments."""
        books = self.books
        return {
            "staging_uri": books.output.staging_uri(books.run.run_id),
            "storage_options": books.output.storage_options,
            "metadata": file_metadata(
                model=books.model, preprocessing=books.preprocessing, run_id=books.run.run_id
            ),
            "reuse": books.run.content,
            "probes": books.run.probes,
        }

    def start(self) -> None:
        """Before any writer runs: clear what dead runs left behind, by the clean-up rule
        (:meth:`Output.remove_orphans`)."""
        self.books.output.remove_orphans(retention=self.books.config.cleanup_retention)

    def consume(self, staged: Iterable[str]) -> RunRecord:
        """Take each writer task's result as it comes; commit checkpoints; settle the run.

        Raises:
            PipelineError: the rows do not add up; the last part is not committed.
            ErrorRateExceededError: too many images failed; only errors are committed.
        """
        started = self.executing_since or time.time()
        for text in staged:
            with self.lock:
                self._take(json.loads(text), started)
        settling = time.time()
        self.timings["execution"] = settling - started
        self.written.sort()
        try:
            if self.drain.draining and not self.all_written():
                # The feed was cut short: stop (watching_drain commits the rest).
                raise self.drain.stopped()
            if self.listing_done is not None:  # every block is written: the listing is done
                self.books = dataclasses.replace(self.books, listing=self.listing_done())
            return self.commit(final=True)
        finally:
            self.timings["commit"] = time.time() - settling

    @property
    def probe_settled(self) -> bool:
        """Whether commits may go on: no probe, or every probe back and judged."""
        return self.probes_expected == 0 or bool(self.probe_verdict)

    def _take(self, returned: Staged, started: float) -> None:
        """One writer task's files: staged, and committed when a checkpoint is due."""
        config = self.books.config
        if returned["refusal"] and config.gate == "on":
            kept = self.kept() if self.checkpoints else "nothing committed"
            raise QualityGateError(
                f"quality gate: {returned['refusal']}: {kept}; --gate off commits them"
            )
        self._judge_probe(returned["probe"])
        self.pending.append(returned)
        rows = sum(n for _, _, n in returned["files"])
        self.written.append((returned["finished_at"] - started, rows))
        self.rows_written += rows
        pending_rows = sum(n for part in self.pending for _, _, n in part["files"])
        due = time.time() - self.last_commit >= config.commit_interval
        # Draining: each task's files are kept as they come.
        if self.probe_settled and (
            pending_rows >= config.commit_every or (pending_rows and (due or self.drain.draining))
        ):
            self.commit(final=False)

    def _judge_probe(self, results: list[ProbeResult]) -> None:
        """Add a writer's probe results; once all are back, the verdict (a failed one stops
        the run before anything is committed, unless --gate off)."""
        if not self.probes_expected or self.probe_verdict:
            return
        self.probe_results += results
        if len(self.probe_results) < self.probes_expected:
            return
        config = self.books.config
        tolerance = config.probe_tolerance or TOLERANCES[self.books.model.precision]
        self.probe_verdict = probe_verdict(self.probe_results, tolerance)
        logger.info("probe: %s", describe_probe(self.probe_verdict))
        if not self.probe_verdict["passed"] and config.gate == "on":
            beyond = [r for r in self.probe_results if (r["error"] or 0.0) > tolerance]
            verdict = self.probe_verdict
            raise QualityGateError(
                f"quality gate: probe: {len(beyond)} of {verdict['compared']} stored images "
                f"re-embed beyond tolerance {tolerance:g} (worst: {verdict['worst']}: "
                f"relative error {verdict['max_error']:.3g}): nothing committed; a changed "
                "model, preprocessing or device? --gate off commits them"
            )

    @contextlib.contextmanager
    def watching_drain(self) -> Iterator[None]:
        """While the plan runs: once a SIGTERM asks for a drain, end the feed and commit what
        is written, at once, in a thread (the handler only sets a flag, and the driver's loop
        may be waiting for the next writer); when the drain stops the run, commit what came in
        since the last commit."""
        finished = threading.Event()

        def watch() -> None:
            self.drain.requested.wait()
            if finished.is_set():
                return
            if self.stop_feeding is not None:
                self.stop_feeding()
            try:
                self.checkpoint_rest()
            except Exception as exc:  # the driver's next commit meets it again
                logger.warning("the drain's checkpoint failed: %s", exc)

        watcher = threading.Thread(target=watch, name="drain", daemon=True)
        watcher.start()
        try:
            yield
        except Stopped as stop:
            if stop.drained:
                self.checkpoint_rest()
            raise
        finally:
            finished.set()
            self.drain.requested.set()  # the watcher ends, or finishes its commit first
            watcher.join()

    def all_written(self) -> bool:
        """Whether every image of the run was written (a drain may have ended the feed)."""
        listing = self.books.listing
        if self.listing_done is not None:
            try:
                listing = self.listing_done()
            except Exception:  # stopped (the drain) or failed: not all of it was fed
                return False
        return self.rows_written == listing.to_embed

    def checkpoint_rest(self) -> None:
        """What is written but not committed, as a checkpoint (a drain); nothing while the
        probe is out (its vectors are not judged yet)."""
        with self.lock:
            if self.pending and not self.probe_settled:
                logger.warning("stopped before the probe came back: nothing more committed")
            elif self.pending:
                self.commit(final=False)

    def commit(self, *, final: bool) -> RunRecord:
        """Commit what is staged since the last commit: a checkpoint, or the run's last. A
        stop signal during it waits for its end (:class:`pipeline.stop.Drain`)."""
        # A stop in the main thread waits for its commit; the drain's thread commits while
        # the main thread may stop: that one then waits on the lock.
        main = threading.current_thread() is threading.main_thread()
        with self.lock:
            self.drain.committing = main
            try:
                return self._commit(final=final)
            finally:
                self.drain.committing = False
                if main:
                    self.drain.stop_after_commit()

    def _commit(self, *, final: bool) -> RunRecord:
        books = self.books
        files: dict[str, list[str]] = {"embeddings": [], "errors": []}
        rows = dict(self.committed_rows)
        for returned in self.pending:
            for table, path, count in returned["files"]:
                files[table].append(path)
                rows[table] += count
        failures = merge_failures(self.failures, *(part["failures"] for part in self.pending))
        quality = merge_quality([self.quality, *(part["quality"] for part in self.pending)])
        reused = self.reused + sum(part["reused"] for part in self.pending)
        embedded, failed = rows["embeddings"], rows["errors"]
        if not self.probe_settled:
            raise PipelineError(
                f"run {books.run.run_id}: {len(self.probe_results)} of the probe's "
                f"{self.probes_expected} images came back; {self.kept()}"
            )
        if final and embedded + failed != books.to_embed:
            # Every new image must come out exactly once, embedded or failed; anything else
            # is a bug or a fault we must not commit.
            raise PipelineError(
                f"run {books.run.run_id} produced {embedded} embeddings + {failed} errors for "
                f"{books.to_embed} images to embed; {self.kept()}"
            )
        # The verdict is the run's, on its totals: checkpoints commit whatever was written.
        too_many = books.error_rate_exceeded(failures) if final else None
        status: RunStatus = (
            ERROR_RATE_EXCEEDED if too_many else COMMITTED if final else CHECKPOINTED
        )
        record = books.record(
            status=status,
            embedded=self.committed_rows["embeddings"] if too_many else embedded,
            failed=failed,
            failures=failures,
            executing_since=self.executing_since,
            checkpoints=self.checkpoints,
            final=final,
            quality=summary(self.quality if too_many else quality)
            | ({"probe": self.probe_verdict} if self.probe_verdict else {}),
            reused=self.reused if too_many else reused,
        )
        if too_many is not None:
            # The errors are worth keeping (they say what to fix); the embeddings are not.
            self.snapshot = commit_run(
                books.output,
                self.snapshot,
                record,
                staged={"errors": files["errors"]},
                verdict=(False, books.complete),
            )
            self.record = record
            raise ErrorRateExceededError(
                f"{too_many}: errors written to {books.output.uri}/errors, "
                + ("no embeddings committed" if not self.checkpoints else self.kept()),
                record,
            )
        self.snapshot = commit_run(
            books.output,
            self.snapshot,
            record,
            staged=files,
            deleted_uris=books.listing.deleted if final else None,
            replace=books.replace and final,
            pending=books.replace and not final,
            final=final,
            verdict=(True, books.complete) if final else None,
        )
        self.committed_rows, self.failures, self.pending = rows, failures, []
        self.quality, self.reused = quality, reused
        self.last_commit = time.time()
        if not final:
            self.checkpoints += 1
        self.record = record
        return record

    def kept(self) -> str:
        if not self.checkpoints:
            return "nothing committed"
        done = sum(self.committed_rows.values())
        return f"{self.checkpoints} checkpoints ({done} images) stay committed"

    def run_without_tasks(self) -> RunRecord:
        """The same lifecycle for a run with nothing to write (every image unchanged)."""
        self.start()
        self.executing_since = time.time()
        return self.consume([])
