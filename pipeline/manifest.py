"""What ``_manifest.json`` holds, typed: the model that made the vectors, each run, the files.

``RunRecord`` (one run: its model, counts, times, committed files) -> ``Manifest`` (the
current files per table and the runs); the model is a :class:`pipeline.embed.ModelIdentity`.
Each has one ``to_json`` and one ``from_json``; the JSON layout is the one the contract
describes. :mod:`pipeline.output` reads and writes it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from pipeline.config import NotRetryableError
from pipeline.embed import ModelIdentity
from pipeline.failures import Failures

MANIFEST_FORMAT = "embed-images/manifest"
MANIFEST_VERSION = 1
TABLES = ("embeddings", "errors", "deletions")

RunStatus = Literal["committed", "failed: error rate", "checkpointed", "compacted"]
COMMITTED: Final = "committed"
ERROR_RATE_EXCEEDED: Final = "failed: error rate"
# Some of the run is committed (its checkpoints); the rest was not, or is still running.
CHECKPOINTED: Final = "checkpointed"
# Not a run of the input: the current table rewritten into fresh files (pipeline.compact).
COMPACTED: Final = "compacted"
# Run records the manifest keeps: older ones go (their files, if still current, stay listed
# under ``current``), so that the manifest stays small after years of nightly runs.
RUN_LOG = 100


class ManifestError(NotRetryableError, ValueError):
    """``_manifest.json`` is not one this build can read: corrupt, foreign, newer, or listing a
    path outside the output's tables."""


def check_table_path(path: Any, where: str) -> str:
    """A manifest's file path, confined to the output's table folders: relative, inside one of
    ``TABLES``, with no ``..``, ``.`` or empty part. Anything else is refused before any file
    is read or deleted through it.

    Example:
        >>> check_table_path("embeddings/run_id=r1/part-0.parquet", "m")
        'embeddings/run_id=r1/part-0.parquet'
    """
    parts = path.split("/") if isinstance(path, str) else []
    if (
        len(parts) < 2
        or parts[0] not in TABLES
        or any(part in ("", ".", "..") for part in parts)
        or "\\" in path
        or "\x00" in path
    ):
        raise ManifestError(
            f"{where} lists {path!r}, which is not a file under its "
            f"{', '.join(TABLES)} folders; nothing was read or deleted through it"
        )
    return str(path)


@dataclasses.dataclass(frozen=True)
class RunCounts:
    """Images of one run: every listed image is unchanged, embedded or failed."""

    listed: int = 0
    skipped_by_extension: int = 0
    unchanged: int = 0  # embedded by an earlier run, same bytes
    known_failed: int = 0  # failed in an earlier run for a lasting reason: not retried
    duplicates: int = 0  # listed more than once (an input list): taken once
    embedded: int = 0
    reused: int = 0  # of the embedded, those whose bytes the table held: vectors copied
    failed: int = 0
    deleted: int = 0

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunCounts:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One run as the manifest records it, and as the command prints it."""

    run_id: str
    input: str
    counts: RunCounts
    model: ModelIdentity | None
    preprocessing: Mapping[str, Any]
    status: RunStatus = COMMITTED
    full: bool = False
    started_at: str = ""
    finished_at: str = ""
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    # Over the embedding phase alone (the dataset's execution), start-up excluded.
    embedding_images_per_second: float = 0.0
    pipeline_version: str = ""
    # This run's failures and the earlier ones it skipped, by error_type.
    failures: Mapping[str, Failures] = dataclasses.field(default_factory=dict)
    known_failures: Mapping[str, Failures] = dataclasses.field(default_factory=dict)
    files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    checkpoints: int = 0  # commits of this run before its last
    # The committed vectors' statistics (pipeline.quality.summary); empty before they existed.
    quality: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def committed(self) -> bool:
        return self.status == COMMITTED

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "input": self.input,
            "full": self.full,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "wall_seconds": self.wall_seconds,
            "images_per_second": self.images_per_second,
            "embedding_images_per_second": self.embedding_images_per_second,
            "counts": self.counts.to_json(),
            "failures": {k: dict(v) for k, v in self.failures.items()},
            "known_failures": {k: dict(v) for k, v in self.known_failures.items()},
            "pipeline_version": self.pipeline_version,
            "model": self.model.to_json() if self.model else None,
            "preprocessing": dict(self.preprocessing),
            "files": {table: list(paths) for table, paths in self.files.items()},
            "checkpoints": self.checkpoints,
            "quality": dict(self.quality),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        model = data.get("model")
        return cls(
            run_id=str(data["run_id"]),
            status=data.get("status", COMMITTED),
            input=str(data.get("input", "")),
            full=bool(data.get("full", False)),
            started_at=str(data.get("started_at", "")),
            finished_at=str(data.get("finished_at", "")),
            wall_seconds=float(data.get("wall_seconds", 0.0)),
            images_per_second=float(data.get("images_per_second", 0.0)),
            embedding_images_per_second=float(data.get("embedding_images_per_second", 0.0)),
            counts=RunCounts.from_json(data.get("counts", {})),
            failures=dict(data.get("failures") or {}),
            known_failures=dict(data.get("known_failures") or {}),
            pipeline_version=str(data.get("pipeline_version", "")),
            model=ModelIdentity.from_json(model) if model else None,
            preprocessing=dict(data.get("preprocessing") or {}),
            files={t: list(p) for t, p in (data.get("files") or {}).items()},
            checkpoints=int(data.get("checkpoints", 0)),
            quality=dict(data.get("quality") or {}),
        )


@dataclasses.dataclass(frozen=True)
class Pending:
    """A ``--full`` run's checkpoints: committed files that are not current yet. They become
    the whole table at once at the run's last commit; until then readers see the old table
    and its model. A ``--full`` run of the same model that finds them resumes them."""

    model: ModelIdentity
    preprocessing: Mapping[str, Any]
    files: Mapping[str, Sequence[str]]
    runs: Sequence[str]  # in commit order

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.to_json(),
            "preprocessing": dict(self.preprocessing),
            "files": {table: list(paths) for table, paths in self.files.items()},
            "runs": list(self.runs),
        }

    def matches(self, model: ModelIdentity | None, preprocessing: Mapping[str, Any]) -> bool:
        """A ``--full`` run of this model and preprocessing resumes these files."""
        return (
            model is not None
            and self.model.first_difference(model) is None
            and _plain(self.preprocessing) == _plain(preprocessing)
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Pending:
        return cls(
            model=ModelIdentity.from_json(data["model"]),
            preprocessing=dict(data.get("preprocessing") or {}),
            files={t: list(p) for t, p in (data.get("files") or {}).items()},
            runs=[str(r) for r in data.get("runs", [])],
        )


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The commit point of an output: its current files per table, and every run.

    ``model`` and ``preprocessing`` are those of every current vector: only a commit that
    replaces the whole table (a ``--full`` run's last) changes them, and a run that would mix
    vectors of another model into the table is refused before it starts.

    ``sequence`` gives each run with current files its place in commit order: a URI's current
    row is the one of the run committed last, whatever the run ids or the drivers' clocks.
    ``refused`` names runs whose failures no verdict has accepted yet (see :mod:`sink`).
    """

    current: Mapping[str, Sequence[str]]
    runs: Sequence[RunRecord]
    model: ModelIdentity | None = None
    preprocessing: Mapping[str, Any] | None = None
    sequence: Mapping[str, int] = dataclasses.field(default_factory=dict)
    pending: Pending | None = None
    refused: Sequence[str] = ()

    @classmethod
    def empty(cls) -> Manifest:
        return cls(current={table: [] for table in TABLES}, runs=[])

    def listed_paths(self) -> set[str]:
        """Every file this manifest lists: current, and a ``--full`` run's pending ones."""
        listed = {path for paths in self.current.values() for path in paths}
        if self.pending is not None:
            listed |= {path for paths in self.pending.files.values() for path in paths}
        return listed

    def committed_run_ids(self) -> set[str]:
        """Runs whose folders hold committed files: those in the run log, and those any
        current file lives in (older runs leave the log, not the table)."""
        return {run.run_id for run in self.runs} | {
            run_of(path) for path in self.listed_paths() if "/run_id=" in path
        }

    def record(self, run_id: str) -> RunRecord | None:
        """The run's record in the log (as its last commit wrote it), if it is there."""
        return next((run for run in self.runs if run.run_id == run_id), None)

    def commit_order(self) -> list[str]:
        """The run ids of the current files, first committed first."""
        runs = {run_of(path) for path in self.listed_paths() if "/run_id=" in path}
        runs |= set(self.sequence)
        return sorted(runs, key=lambda run_id: (self.sequence.get(run_id, -1), run_id))

    def with_run(
        self, run: RunRecord, *, replace: bool = False, pending: bool = False
    ) -> tuple[Manifest, list[str]]:
        """This manifest with ``run`` added.

        Args:
            run: The run's record; its ``files`` are the ones this commit adds. A run already
                recorded (an earlier checkpoint of it) is replaced by ``run``.
            replace: The run's last commit replaces the whole table: the current files become
                its files (with the pending ones of the ``--full`` runs it resumed), its model
                the table's, and every earlier file stops being current.
            pending: A checkpoint of a run that will replace the table: its files are added to
                ``pending``, and nothing current changes (not the model either).

        Returns:
            The new manifest, and the files that stopped being current.
        """
        superseded: list[str] = []
        current: dict[str, list[str]] = {t: list(self.current.get(t, [])) for t in TABLES}
        sequence = dict(self.sequence)
        next_seq = max(sequence.values(), default=-1) + 1
        model, preprocessing, waiting = self.model, self.preprocessing, self.pending
        if replace and run.status == COMPACTED:
            # The current table rewritten: a --full run's pending files stay pending.
            mine = {p for paths in run.files.values() for p in paths}
            superseded = [p for paths in current.values() for p in paths if p not in mine]
            current = {t: sorted(run.files.get(t, [])) for t in TABLES}
            sequence = {run.run_id: next_seq}
        elif pending or replace:
            resumed = (
                waiting
                if waiting is not None and waiting.matches(run.model, run.preprocessing)
                else None
            )
            files = {
                t: [*(resumed.files.get(t, []) if resumed else []), *run.files.get(t, [])]
                for t in TABLES
            }
            runs = [*(r for r in (resumed.runs if resumed else []) if r != run.run_id), run.run_id]
            assert run.model is not None, "a run that replaces the table names its model"
            waiting = Pending(
                model=run.model, preprocessing=run.preprocessing, files=files, runs=runs
            )
            if replace:
                listed = {p for paths in waiting.files.values() for p in paths}
                superseded = [p for paths in current.values() for p in paths if p not in listed]
                current = {t: sorted(waiting.files.get(t, [])) for t in TABLES}
                sequence = {r: next_seq + i for i, r in enumerate(waiting.runs)}
                model, preprocessing, waiting = run.model, run.preprocessing, None
        else:
            for table in TABLES:
                current[table] = sorted(current[table] + list(run.files.get(table, [])))
            sequence.setdefault(run.run_id, next_seq)
            if model is None:  # the first vectors decide the table's model
                model, preprocessing = run.model, run.preprocessing
        earlier = next((r for r in self.runs if r.run_id == run.run_id), None)
        if earlier is not None:  # a checkpoint: the record holds all of the run's files
            run = dataclasses.replace(
                run,
                files={
                    table: [*earlier.files.get(table, []), *run.files.get(table, [])]
                    for table in TABLES
                    if earlier.files.get(table) or run.files.get(table)
                },
            )
        live = {run_of(p) for paths in current.values() for p in paths if "/run_id=" in p}
        manifest = Manifest(
            current=current,
            runs=[*(r for r in self.runs if r.run_id != run.run_id), run][-RUN_LOG:],
            model=model,
            preprocessing=preprocessing,
            sequence={r: n for r, n in sequence.items() if r in live or r == run.run_id},
            pending=waiting,
            refused=[r for r in self.refused if r in live],
        )
        return manifest, superseded

    def with_verdict(self, run_id: str, *, accepted: bool, complete: bool) -> Manifest:
        """Record a run's verdict on the failures it counted: a refused run's failures go on
        counting in later verdicts; an accepted complete run has counted every earlier
        refused run's failures that are still current, so they are accepted with it."""
        if not accepted:
            refused = [*(r for r in self.refused if r != run_id), run_id]
        elif complete:
            refused = []
        else:
            refused = list(self.refused)
        return dataclasses.replace(self, refused=refused)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "current": {table: list(self.current.get(table, [])) for table in TABLES},
            "sequence": dict(self.sequence),
            "refused": list(self.refused),
            "runs": [run.to_json() for run in self.runs],
        }
        if self.model is not None:
            data["model"] = self.model.to_json()
        if self.preprocessing is not None:
            data["preprocessing"] = dict(self.preprocessing)
        if self.pending is not None:
            data["pending"] = self.pending.to_json()
        return data

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2).encode()

    @classmethod
    def from_json(cls, data: Any, *, where: str = "manifest") -> Manifest:
        """Parse and check a manifest; :class:`ManifestError`, in one line, when it is not
        one this build can read or it lists a path outside the output's tables."""
        if not isinstance(data, Mapping) or data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where} is not an embed-images manifest")
        version = data.get("version")
        if not isinstance(version, int) or version < 1:
            raise ManifestError(f"{where} has no valid format version ({version!r})")
        if version > MANIFEST_VERSION:
            raise ManifestError(
                f"{where} was written by a newer embed-images (manifest version {version}; "
                f"this one reads up to {MANIFEST_VERSION}): upgrade embed-images"
            )
        try:
            manifest = cls._parse(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where} is not a valid embed-images manifest ({exc!r})") from None
        for path in manifest.listed_paths():
            check_table_path(path, where)
        for run in manifest.runs:
            for paths in run.files.values():
                for path in paths:
                    check_table_path(path, where)
        return manifest

    @classmethod
    def _parse(cls, data: Mapping[str, Any]) -> Manifest:
        model = data.get("model")
        current = data.get("current", {})
        if not isinstance(current, Mapping):
            raise TypeError("current is not an object")
        listed = {
            t: [str(p) if isinstance(p, str) else p for p in current.get(t, [])] for t in TABLES
        }
        pending = data.get("pending")
        sequence = data.get("sequence")
        if sequence is None:  # written before commit order was recorded: run ids sort in time
            runs = sorted({run_of(p) for ps in listed.values() for p in ps if "/run_id=" in str(p)})
            sequence = {run_id: n for n, run_id in enumerate(runs)}
        return cls(
            current=listed,
            runs=[RunRecord.from_json(run) for run in data.get("runs", [])],
            model=ModelIdentity.from_json(model) if model else None,
            preprocessing=data.get("preprocessing"),
            sequence={str(k): int(v) for k, v in dict(sequence).items()},
            pending=Pending.from_json(pending) if pending else None,
            refused=[str(r) for r in data.get("refused", [])],
        )


def run_of(path: str) -> str:
    """The run a table file belongs to: ``TABLE/run_id=RUN/part-….parquet`` -> ``RUN``."""
    return path.split("/run_id=", 1)[1].split("/", 1)[0]


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), for comparing a record with a spec."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def new_run_id(now: dt.datetime | None = None) -> str:
    """A sortable, path-safe run id, e.g. ``20261125T151307Z-3f9a1c``."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def utc_iso() -> str:
    """Now, in UTC, to the second: ``2026-11-25T15:13:07Z``."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
