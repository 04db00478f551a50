"""Stages 4 and 5 as Ray Data runs them: a ``Datasink`` whose lifecycle is the run's commit.

    on_write_start       (driver) delete what runs that never committed left behind
    write                (tasks)  write_batch: uniquely named files into OUTPUT/_staging/RUN_ID/
    on_write_complete    (driver) every image once? error rate? then Output.commit

Writer tasks are map tasks to Ray Data, so they are retried on the errors named in
``DataContext.retried_map_errors``, like the decode tasks. A retried task's files get new
names and only the names the driver receives are committed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from pipeline.config import EmbedConfig, PipelineError
from pipeline.incremental import NewImages
from pipeline.manifest import (
    COMMITTED,
    ERROR_RATE_EXCEEDED,
    Failures,
    ModelIdentity,
    RunCounts,
    RunRecord,
    count_failures,
    describe_failures,
    failures_by_type,
    merge_failures,
)
from pipeline.output import Output, Snapshot
from pipeline.write import file_metadata, write_batch


class Staged(TypedDict):
    """What one writer task returns to the driver."""

    # (table, path relative to the run's staging folder, rows) per file written.
    files: list[tuple[str, str, int]]
    failures: dict[str, Failures]
    finished_at: float  # when the task's files were written: the run report's throughput


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
    """What the driver knows of a run before it executes, and settles at its commit.

    ``listing`` holds the books on every listed image (unchanged, known failed, gone); its
    chunks' references stay in the driver with it.
    """

    run_id: str
    input_uri: str
    output: Output
    snapshot: Snapshot
    model: ModelIdentity
    preprocessing: Mapping[str, Any]
    listing: NewImages
    config: EmbedConfig
    started: float
    started_at: str

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

    def error_rate_exceeded(self, failures: Mapping[str, Failures]) -> str | None:
        """What is wrong when this run's and the known failures exceed ``--max-error-rate``.

        Args:
            failures: This run's failures by type (none yet, before the run executes: then
                the known failures alone are checked).
        """
        failed = count_failures(failures) + self.known_failed
        attempted = self.to_embed + self.known_failed
        rate = failed / attempted if attempted else 0.0
        if rate <= self.config.max_error_rate:
            return None
        earlier = f", {self.known_failed} of them in earlier runs" if self.known_failed else ""
        kinds = describe_failures(merge_failures(failures, self.listing.known_failures))
        return (
            f"{failed} of {attempted} images failed ({rate:.1%}: {kinds}{earlier}), above "
            f"--max-error-rate {self.config.max_error_rate:.1%}"
        )

    def refuse_known_failures(self) -> None:
        """Raise when earlier runs' lasting failures alone exceed ``--max-error-rate``:
        embedding the rest could not pass, so nothing is embedded."""
        known_bad = self.error_rate_exceeded({})
        if known_bad:
            raise ErrorRateExceededError(
                f"{known_bad}: nothing embedded; fix or remove those images (see "
                f"{self.output.uri}/errors), or raise --max-error-rate"
            )

    def settle(self, staged: list[Staged], *, executing_since: float | None) -> RunRecord:
        """Check the run's rows, decide on its error rate, commit, and return its record.

        Images that failed in earlier runs for a lasting reason are not retried, but they still
        count toward ``--max-error-rate``: a rerun does not turn a failing input into a
        passing one.

        Raises:
            PipelineError: the rows do not add up; nothing is committed.
            ErrorRateExceededError: too many images failed; only ``errors/`` is committed.
        """
        from pipeline import __version__

        files: dict[str, list[str]] = {"embeddings": [], "errors": []}
        rows = {"embeddings": 0, "errors": 0}
        for returned in staged:
            for table, path, count in returned["files"]:
                files[table].append(path)
                rows[table] += count
        failures = merge_failures(*(returned["failures"] for returned in staged))
        embedded, failed = rows["embeddings"], rows["errors"]
        if embedded + failed != self.to_embed:
            # Every new image must come out exactly once, embedded or failed; anything else
            # is a bug or a fault we must not commit.
            raise PipelineError(
                f"run {self.run_id} produced {embedded} embeddings + {failed} errors for "
                f"{self.to_embed} images to embed; nothing committed"
            )
        now = time.time()
        wall = now - self.started
        embedding = now - executing_since if executing_since else 0.0
        too_many = self.error_rate_exceeded(failures)
        too_many_errors = too_many is not None
        record = RunRecord(
            run_id=self.run_id,
            status=ERROR_RATE_EXCEEDED if too_many_errors else COMMITTED,
            input=self.input_uri,
            full=self.config.full,
            started_at=self.started_at,
            finished_at=utc_iso(),
            wall_seconds=round(wall, 3),
            images_per_second=round(embedded / wall if wall > 0 else 0.0, 3),
            embedding_images_per_second=round(embedded / embedding if embedding > 0 else 0.0, 3),
            failures=failures,
            known_failures=dict(self.listing.known_failures),
            counts=RunCounts(
                listed=self.listing.counts.listed,
                skipped_by_extension=self.listing.counts.skipped_by_extension,
                unchanged=self.listing.unchanged,
                known_failed=self.known_failed,
                embedded=0 if too_many_errors else embedded,
                failed=failed,
                deleted=0 if too_many_errors else len(self.listing.deleted),
            ),
            pipeline_version=__version__,
            model=self.model,
            preprocessing=self.preprocessing,
        )
        if too_many is not None:
            # The errors are worth keeping (they say what to fix); the embeddings are not.
            self.output.commit(self.snapshot, record, staged={"errors": files["errors"]})
            raise ErrorRateExceededError(
                f"{too_many}: errors written to {self.output.uri}/errors, no embeddings committed",
                record,
            )
        self.output.commit(
            self.snapshot,
            record,
            staged=files,
            deleted_uris=self.listing.deleted,
            replace=self.replace,
        )
        return record


class RunSink(Datasink[Staged]):
    """One run's writes and commit (pass to ``Dataset.write_datasink``).

    Ray Data bundles model batches until a writer task has at least ``--rows-per-file`` rows,
    and the task writes them as one file.

    Args:
        books: The run's books; they stay in the driver (write tasks get only what they
            write with: the staging URI, storage options and file metadata).
    """

    def __init__(self, books: RunBooks) -> None:
        self.books: RunBooks | None = books
        self.rows_per_file = books.config.rows_per_file
        self.staging_uri = books.output.staging_uri(books.run_id)
        self.storage_options = books.output.storage_options
        self.metadata = file_metadata(
            model=books.model, preprocessing=books.preprocessing, run_id=books.run_id
        )
        self.record: RunRecord | None = None
        # A listing that streams while the run executes: its books, once it is done.
        self.listing_done: Callable[[], NewImages] | None = None
        self.executing_since: float | None = None  # set by the plan when execution starts
        # For the run report: seconds per phase, and (seconds since start, images) per task.
        self.timings: dict[str, float] = {}
        self.written: list[tuple[float, int]] = []

    def __getstate__(self) -> dict[str, Any]:
        # The books hold the snapshot and the deleted URIs: nothing a writer task needs.
        return self.__dict__ | {"books": None, "record": None, "written": [], "listing_done": None}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        books = self._books()
        books.output.discard_uncommitted(books.snapshot)

    def write(self, blocks: Iterable[Block], ctx: Any) -> Staged:
        batches = [BlockAccessor.for_block(block).to_numpy() for block in blocks]
        batches = [b for b in batches if len(b["uri"])]
        if not batches:
            return {"files": [], "failures": {}, "finished_at": time.time()}
        batch = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
        failed = np.asarray(batch["error_type"] != "", dtype=bool)
        out = write_batch(
            batch,  # type: ignore[arg-type]
            staging_uri=self.staging_uri,
            storage_options=self.storage_options,
            metadata=self.metadata,
        )
        return {
            "files": [
                (str(t), str(p), int(n))
                for t, p, n in zip(out["table"], out["path"], out["rows"], strict=True)
            ],
            "failures": failures_by_type(
                batch["error_type"][failed],
                batch["uri"][failed],
                batch["error_message"][failed],
            ),
            "finished_at": time.time(),
        }

    def on_write_complete(self, write_result: WriteResult[Staged]) -> None:
        started, settling = self.executing_since or time.time(), time.time()
        self.timings["execution"] = settling - started
        self.written = sorted(
            (returned["finished_at"] - started, sum(n for _, _, n in returned["files"]))
            for returned in write_result.write_returns
        )
        try:
            if self.listing_done is not None:  # every block is written: the listing is done
                self.books = dataclasses.replace(self._books(), listing=self.listing_done())
            self.record = self._books().settle(
                write_result.write_returns, executing_since=self.executing_since
            )
        except ErrorRateExceededError as exc:
            self.record = exc.record
            raise
        finally:
            self.timings["commit"] = time.time() - settling

    def run_without_tasks(self) -> RunRecord:
        """The same lifecycle for a run with nothing to write (every image unchanged)."""
        self.on_write_start()
        self.on_write_complete(WriteResult(num_rows=0, size_bytes=0, write_returns=[]))
        assert self.record is not None
        return self.record

    def _books(self) -> RunBooks:
        if self.books is None:
            raise RuntimeError("RunSink's driver callbacks ran outside the driver")
        return self.books


def utc_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
