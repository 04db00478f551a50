"""What ``_manifest.json`` holds, typed: the model that made the vectors, each run, the files.

``ModelIdentity`` (one source of truth for the model's name, weights, dimension, dtype and the
precision actually used) -> ``RunRecord`` (one run: counts, times, committed files) ->
``Manifest`` (the current files per table and the runs). Each has one ``to_json`` and one
``from_json``; the JSON layout is the one the contract describes. :mod:`pipeline.output`
reads and writes it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from pipeline.config import Precision
from pipeline.embed import EMBEDDING_DIM

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


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What made a table's vectors; the manifest and every Parquet file record the same one.

    Example:
        >>> ModelIdentity(weights="random:seed=0", weights_sha256="ab" * 32,
        ...               normalized=False, precision="fp32").to_parquet_metadata()["model"]
        'resnet50'
    """

    weights: str
    weights_sha256: str
    normalized: bool
    precision: Precision
    name: str = "resnet50"
    embedding_dim: int = EMBEDDING_DIM
    embedding_dtype: str = "float32"

    # What makes two tables' vectors comparable (precision alone does not change the model).
    COMPARED = ("weights_sha256", "normalized", "embedding_dim")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "embedding_dim": self.embedding_dim,
            "embedding_dtype": self.embedding_dtype,
            "normalized": self.normalized,
            "precision": self.precision,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelIdentity:
        return cls(
            name=str(data.get("name", "resnet50")),
            weights=str(data["weights"]),
            weights_sha256=str(data["weights_sha256"]),
            embedding_dim=int(data.get("embedding_dim", EMBEDDING_DIM)),
            embedding_dtype=str(data.get("embedding_dtype", "float32")),
            normalized=bool(data.get("normalized", False)),
            precision=data.get("precision", "fp32"),
        )

    def to_parquet_metadata(self) -> dict[str, str]:
        """Parquet key-value metadata (strings only)."""
        return {
            "model": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "embedding_dim": str(self.embedding_dim),
            "embedding_dtype": self.embedding_dtype,
            "normalized": json.dumps(self.normalized),
            "precision": self.precision,
        }

    def first_difference(self, other: ModelIdentity) -> tuple[str, Any, Any] | None:
        """``(key, ours, theirs)`` for the first compared key that differs, else ``None``."""
        for key in self.COMPARED:
            if getattr(self, key) != getattr(other, key):
                return key, getattr(self, key), getattr(other, key)
        return None


# Failed images of one kind: how many, and one of them to look at.
Failures = dict[str, Any]  # {"count": int, "example_uri": str, "example_message": str}


def failures_by_type(
    error_types: Sequence[Any], uris: Sequence[Any], messages: Sequence[Any] | None = None
) -> dict[str, Failures]:
    """``{error_type: {"count": n, "example_uri": …, "example_message": …}}``, by type.

    Example:
        >>> failures_by_type(["empty", "truncated", "empty"], ["/a", "/b", "/c"])["empty"]
        {'count': 2, 'example_uri': '/a', 'example_message': ''}
    """
    found: dict[str, Failures] = {}
    texts = messages if messages is not None else [""] * len(uris)
    for error_type, uri, message in zip(error_types, uris, texts, strict=True):
        entry = found.setdefault(
            str(error_type), {"count": 0, "example_uri": str(uri), "example_message": str(message)}
        )
        entry["count"] += 1
    return dict(sorted(found.items()))


def merge_failures(*parts: Mapping[str, Failures]) -> dict[str, Failures]:
    merged: dict[str, Failures] = {}
    for part in parts:
        for error_type, entry in part.items():
            into = merged.setdefault(error_type, dict(entry) | {"count": 0})
            into["count"] += int(entry["count"])
    return dict(sorted(merged.items()))


def count_failures(failures: Mapping[str, Failures]) -> int:
    return sum(int(entry["count"]) for entry in failures.values())


def describe_failures(failures: Mapping[str, Failures]) -> str:
    """``truncated 2, empty 1`` (most first)."""
    ordered = sorted(failures.items(), key=lambda item: (-item[1]["count"], item[0]))
    return ", ".join(f"{error_type} {entry['count']}" for error_type, entry in ordered)


@dataclasses.dataclass(frozen=True)
class RunCounts:
    """Images of one run: every listed image is unchanged, embedded or failed."""

    listed: int = 0
    skipped_by_extension: int = 0
    unchanged: int = 0  # embedded by an earlier run, same bytes
    known_failed: int = 0  # failed in an earlier run for a lasting reason: not retried
    embedded: int = 0
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
        )


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The commit point of an output: its current files per table, and every run.

    ``model`` and ``preprocessing`` are those of the latest run; a run that would mix vectors
    of another model into the table is refused before it starts.
    """

    current: Mapping[str, Sequence[str]]
    runs: Sequence[RunRecord]
    model: ModelIdentity | None = None
    preprocessing: Mapping[str, Any] | None = None

    @classmethod
    def empty(cls) -> Manifest:
        return cls(current={table: [] for table in TABLES}, runs=[])

    def committed_run_ids(self) -> set[str]:
        """Runs whose folders hold committed files: those in the run log, and those any
        current file lives in (older runs leave the log, not the table)."""
        return {run.run_id for run in self.runs} | {
            path.split("/run_id=", 1)[1].split("/", 1)[0]
            for paths in self.current.values()
            for path in paths
            if "/run_id=" in path
        }

    def checkpointed_run_ids(self) -> set[str]:
        """Runs with some files committed whose last commit may not have happened."""
        return {run.run_id for run in self.runs if run.status == CHECKPOINTED}

    def with_run(self, run: RunRecord, *, replace: bool = False) -> tuple[Manifest, list[str]]:
        """This manifest with ``run`` added (its ``files`` become current).

        A run already recorded (an earlier checkpoint of it) is replaced by ``run``, whose
        ``files`` are then the ones this commit adds.

        Returns:
            The new manifest, and the files that stopped being current (``replace``: all the
            earlier runs' ones, for a run that re-embedded everything).
        """
        superseded: list[str] = []
        current: dict[str, list[str]] = {}
        own = f"/run_id={run.run_id}/"
        for table in TABLES:
            before = list(self.current.get(table, []))
            if replace:
                superseded += [path for path in before if own not in path]
                before = [path for path in before if own in path]
            current[table] = sorted(before + list(run.files.get(table, [])))
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
        manifest = Manifest(
            current=current,
            runs=[*(r for r in self.runs if r.run_id != run.run_id), run][-RUN_LOG:],
            model=run.model or self.model,
            preprocessing=run.preprocessing or self.preprocessing,
        )
        return manifest, superseded

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "current": {table: list(self.current.get(table, [])) for table in TABLES},
            "runs": [run.to_json() for run in self.runs],
        }
        if self.model is not None:
            data["model"] = self.model.to_json()
        if self.preprocessing is not None:
            data["preprocessing"] = dict(self.preprocessing)
        return data

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2).encode()

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str = "manifest") -> Manifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{where} is not an embed-images manifest")
        model = data.get("model")
        return cls(
            current={t: list(data.get("current", {}).get(t, [])) for t in TABLES},
            runs=[RunRecord.from_json(run) for run in data.get("runs", [])],
            model=ModelIdentity.from_json(model) if model else None,
            preprocessing=data.get("preprocessing"),
        )
