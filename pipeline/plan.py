"""The wiring: one Ray Data plan from listing to committed Parquet.

list (driver, streaming) -> decode_batch (CPU tasks) -> ResNet50Embedder (actor pool)
-> write_batch (CPU tasks, into staging) -> commit_run (driver: move, then manifest last).
This module uses Ray but never starts it: the entry points start or join a cluster.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import EmbedConfig, PipelineError
from pipeline.decode import TRANSIENT_READ_ERROR, decode_batch
from pipeline.embed import CPU_ACTOR_ENV, EMBEDDING_DIM, ResNet50Embedder
from pipeline.incremental import committed_keys, mark_seen, select_new
from pipeline.listing import IMAGE_EXTENSIONS, InputError, ListingCounts, list_images
from pipeline.manifest import (
    commit_run,
    discard_uncommitted,
    manifest_version,
    read_embeddings,
    read_manifest,
    staging_uri,
)
from pipeline.preprocessing import PreprocessSpec, preprocess_spec
from pipeline.storage import is_local, one_line, open_fs, storage_errors, to_uri
from pipeline.weights import ResolvedWeights, load_weights, sniff_checkpoint
from pipeline.write import file_metadata, write_batch

logger = logging.getLogger(__name__)

# Listing rows per object-store chunk: ten million keys stay some 40,000 refs in the driver.
# The plan re-splits the chunks into decode-sized blocks before decoding.
LISTING_BLOCK_ROWS = 256

# Written and deleted at start: an unwritable output fails before any work is done.
WRITE_PROBE = "_write_probe"

# s3fs words S3 throttling this way; Ray's default retried I/O errors do not match it.
RETRIED_IO_ERRORS = ("Please reduce your request rate", "SlowDown")
# Task-level retries of a stage after s3fs's and botocore's own retries are spent.
MAX_MAP_RETRIES = 2


@dataclasses.dataclass(frozen=True)
class RunSummary:
    run_id: str
    output: str
    listed: int
    skipped_by_extension: int
    embedded: int
    failed: int
    wall_seconds: float
    unchanged: int = 0
    deleted: int = 0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.wall_seconds if self.wall_seconds > 0 else 0.0


def new_run_id(now: dt.datetime | None = None) -> str:
    """A sortable, path-safe run id, e.g. ``20261125T151307Z-3f9a1c``."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """A run checked and ready: its filesystems, weights and preprocessing, no Ray needed yet."""

    config: EmbedConfig
    run_id: str
    started: float
    started_at: str
    input_fs: Any
    input_root: str
    input_uri: str
    output_uri: str
    weights: ResolvedWeights
    spec: PreprocessSpec


def prepare_run(
    config: EmbedConfig,
    *,
    run_id: str | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> PreparedRun:
    """Check everything that can fail fast, before any data moves.

    Resolves input and output, refuses an output inside the input, checks the output is
    writable, then loads and checks the weights (checksum, ResNet50 shape).

    Args:
        config: The run's knobs.
        run_id: Override the generated run id.
        meanwhile: Called in this thread once the input and output checks pass, while the
            weights load in another (the CLI starts Ray there: the two take seconds each).

    Raises:
        PipelineError: with one line saying what to fix.
    """
    started, started_at = time.time(), _utc_iso()
    options = config.fs_options()
    in_fs, in_root = open_fs(config.input, options)
    out_fs, out_root = open_fs(config.output, options)
    input_uri, output_uri = to_uri(in_fs, in_root), to_uri(out_fs, out_root)
    if type(in_fs) is type(out_fs) and (out_root + "/").startswith(in_root.rstrip("/") + "/"):
        raise PipelineError(
            f"output {output_uri} is inside input {input_uri}: its Parquet files would be "
            "listed by later runs; choose an output outside the input"
        )
    with storage_errors(input_uri):
        if not in_fs.exists(in_root):
            raise InputError(f"input not found: {input_uri}")
    with storage_errors(output_uri):
        _check_output_writable(out_fs, out_root, output_uri)
    sniff_checkpoint(config.weights, storage_options=options)  # a missing or junk file: now
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weights") as pool:
        loading = pool.submit(
            load_weights,
            config.weights,
            sha256=config.weights_sha256,
            seed=config.seed,
            storage_options=options,
        )
        if meanwhile is not None:
            meanwhile()
        weights = loading.result()
    return PreparedRun(
        config=config,
        run_id=run_id or new_run_id(),
        started=started,
        started_at=started_at,
        input_fs=in_fs,
        input_root=in_root,
        input_uri=input_uri,
        output_uri=output_uri,
        weights=weights,
        spec=preprocess_spec(config.resize, jpeg_draft=config.jpeg_draft),
    )


def run_pipeline(config: EmbedConfig, *, run_id: str | None = None) -> RunSummary:
    """Embed every image under ``config.input`` into ``config.output`` and commit the run.

    Ray must already be initialised (``ray.init``, or a job's driver).

    Args:
        config: The run's knobs.
        run_id: Override the generated run id.

    Returns:
        The counts and timings of the committed run.

    Raises:
        PipelineError: bad input, output or weights; nothing is committed.

    Example:
        >>> ray.init()  # doctest: +SKIP
        >>> run_pipeline(EmbedConfig(input="./photos", output="./out"))  # doctest: +SKIP
    """
    return execute_run(prepare_run(config, run_id=run_id))


def execute_run(
    prepared: PreparedRun, *, embedder: type[ResNet50Embedder] = ResNet50Embedder
) -> RunSummary:
    """List, embed, write and commit a prepared run on the running Ray.

    Args:
        prepared: From :func:`prepare_run`.
        embedder: The model stage's class (a subclass may wrap it, e.g. to inject faults).
    """
    import ray

    config, run_id, spec = prepared.config, prepared.run_id, prepared.spec
    options = config.fs_options()
    discard_uncommitted(config.output, storage_options=options)
    model_block = _model_block(prepared)
    # The manifest as this run found it: the commit fails if another run has committed since.
    version = manifest_version(config.output, storage_options=options)
    previous = read_manifest(config.output, storage_options=options)
    if previous and not config.full:
        _check_same_model(previous, model_block, spec.to_metadata(), prepared.output_uri)

    listing = list_new_images(prepared, previous if not config.full else None)
    counts = listing.counts
    if counts.listed == 0:
        raise InputError(
            f"no images under {prepared.input_uri} ({counts.skipped_by_extension} other files "
            f"skipped; images end in .{', .'.join(sorted(IMAGE_EXTENSIONS))})"
        )
    logger.info(
        "listed %d images under %s: %d new or changed, %d unchanged, %d gone, %d skipped",
        counts.listed,
        prepared.input_uri,
        counts.listed - listing.unchanged,
        listing.unchanged,
        len(listing.deleted),
        counts.skipped_by_extension,
    )

    staged: dict[str, list[str]] = {"embeddings": [], "errors": []}
    rows = {"embeddings": 0, "errors": 0}
    if listing.refs:
        dataset = build_dataset(prepared, listing.refs, model_block["precision"], embedder)
        try:
            written = dataset.take_all()
        except ray.exceptions.RayError as exc:
            # A stage failed beyond Ray's retries (e.g. the output store is down): the
            # staging files are not committed; the next run discards them.
            raise PipelineError(
                f"the pipeline failed, nothing committed: {_root_cause(exc)}"
            ) from None
        for row in written:
            staged[str(row["table"])].append(str(row["path"]))
            rows[str(row["table"])] += int(row["rows"])
    expected = counts.listed - listing.unchanged
    if rows["embeddings"] + rows["errors"] != expected:
        # Every new image must come out exactly once, embedded or failed; anything else is a
        # bug or a fault we must not commit.
        raise PipelineError(
            f"run {run_id} produced {rows['embeddings']} embeddings + {rows['errors']} errors "
            f"for {expected} images to embed; nothing committed"
        )

    wall = time.time() - prepared.started
    summary = RunSummary(
        run_id=run_id,
        output=prepared.output_uri,
        listed=counts.listed,
        skipped_by_extension=counts.skipped_by_extension,
        unchanged=listing.unchanged,
        embedded=rows["embeddings"],
        failed=rows["errors"],
        deleted=len(listing.deleted),
        wall_seconds=wall,
    )
    error_rate = summary.failed / expected if expected else 0.0
    too_many_errors = error_rate > config.max_error_rate
    from pipeline import __version__

    run_record: dict[str, Any] = {
        "run_id": run_id,
        "status": "failed: error rate" if too_many_errors else "committed",
        "input": prepared.input_uri,
        "full": config.full,
        "started_at": prepared.started_at,
        "finished_at": _utc_iso(),
        "wall_seconds": round(wall, 3),
        "images_per_second": round(summary.images_per_second, 3),
        "counts": {
            "listed": counts.listed,
            "skipped_by_extension": counts.skipped_by_extension,
            "unchanged": listing.unchanged,
            "embedded": 0 if too_many_errors else summary.embedded,
            "failed": summary.failed,
            "deleted": 0 if too_many_errors else summary.deleted,
        },
        "pipeline_version": __version__,
        "model": model_block,
        "preprocessing": spec.to_metadata(),
    }
    if too_many_errors:
        # The errors are worth keeping (they say what to fix); the embeddings are not committed.
        commit_run(
            config.output,
            run=run_record,
            staged={"errors": staged["errors"]},
            expected_version=version,
            storage_options=options,
        )
        raise ErrorRateExceededError(
            f"{summary.failed} of {expected} images failed ({error_rate:.1%}), above "
            f"--max-error-rate {config.max_error_rate:.1%}: errors written to "
            f"{prepared.output_uri}/errors, no embeddings committed"
        )
    commit_run(
        config.output,
        run=run_record,
        staged=staged,
        deleted_uris=listing.deleted,
        replace=config.full and config.limit is None,
        expected_version=version,
        storage_options=options,
    )
    return summary


class ErrorRateExceededError(PipelineError):
    """More images failed than ``--max-error-rate`` allows."""


@dataclasses.dataclass
class NewImages:
    refs: list[Any]
    counts: ListingCounts
    unchanged: int
    deleted: pa.Array


def list_new_images(prepared: PreparedRun, previous: dict[str, Any] | None) -> NewImages:
    """List the input and keep what the committed tables do not already hold.

    Each kept chunk goes to the object store as it is listed, so the driver holds one chunk of
    the listing at a time, plus the current table's keys when there is one.
    """
    import ray

    config = prepared.config
    counts = ListingCounts()
    if previous is None:
        known = pa.array([], pa.string())
        current_uris = pa.array([], pa.string())
    else:
        state = {
            name: read_embeddings(
                config.output,
                storage_options=config.fs_options(),
                columns=columns,
                table=name,
            )
            for name, columns in (
                ("embeddings", ["uri", "file_size", "source_version"]),
                ("errors", ["uri", "file_size", "source_version", "error_type"]),
            )
        }
        known = committed_keys(state["embeddings"], state["errors"])
        current_uris = pa.concat_arrays(
            [state[n]["uri"].combine_chunks().cast(pa.string()) for n in state]
        )
    seen = np.zeros(len(current_uris), dtype=bool)
    refs, unchanged = [], 0
    for chunk in list_images(
        prepared.input_fs,
        prepared.input_root,
        counts,
        chunk_rows=LISTING_BLOCK_ROWS,
        limit=config.limit,
    ):
        mark_seen(seen, current_uris, chunk)
        new = select_new(chunk, known)
        unchanged += chunk.num_rows - new.num_rows
        if new.num_rows:
            refs.append(ray.put(new))
    # Only a complete listing can tell that an image is gone.
    deleted = current_uris.filter(pa.array(~seen)) if config.limit is None else current_uris[:0]
    return NewImages(refs=refs, counts=counts, unchanged=unchanged, deleted=deleted)


def build_dataset(
    prepared: PreparedRun,
    refs: list[Any],
    precision: str,
    embedder: type[ResNet50Embedder] = ResNet50Embedder,
) -> Any:
    """The Ray Data plan: decode tasks -> model actor pool -> writer tasks."""
    import ray

    config, spec, weights = prepared.config, prepared.spec, prepared.weights
    options = config.fs_options()
    num_gpus = _num_gpus(config)
    from pipeline import __version__

    metadata = file_metadata(
        run_id=prepared.run_id,
        weights=weights.to_metadata(),
        preprocessing=spec.to_metadata(),
        normalized=config.normalize,
        pipeline_version=__version__,
    )
    context = ray.data.DataContext.get_current()
    for message in RETRIED_IO_ERRORS:
        if message not in context.retried_io_errors:
            context.retried_io_errors.append(message)
    # Our stages do their own I/O inside map_batches, where Ray Data retries only the user
    # errors listed here. Retrying is safe: decode is pure, and a retried writer's files get
    # new names and are never committed.
    context.retried_map_errors = [*RETRIED_IO_ERRORS, TRANSIENT_READ_ERROR]
    context.max_map_retries = MAX_MAP_RETRIES
    return (
        # Ray's annotations reject keyword-only UDFs and plain ObjectRef lists: hence the ignores.
        ray.data.from_arrow_refs(refs)  # type: ignore[arg-type]
        # Listing chunks are large (few refs in the driver); split them into decode-sized
        # blocks so decode tasks run in parallel and images stream through the model stage
        # instead of moving in listing-chunk steps.
        .repartition(target_num_rows_per_block=config.decode_batch_size)
        .map_batches(
            decode_batch,  # type: ignore[arg-type]
            batch_size=config.decode_batch_size,
            batch_format="numpy",
            fn_kwargs={
                "spec": spec,
                "storage_options": options,
                "max_image_pixels": config.max_image_pixels,
            },
            num_cpus=config.decode_cpus,
            # A memory reservation bounds concurrent decodes by RAM, and, being a remote arg
            # the model stage lacks, it also stops Ray from fusing decode into the model actor,
            # where it would run serially with the forward passes.
            memory=config.decode_memory,
        )
        .map_batches(
            embedder,
            batch_size=config.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "state_dict": weights.as_numpy(),
                "mean": spec.mean,
                "std": spec.std,
                "precision": precision,
                "normalize": config.normalize,
                "num_threads": config.model_threads,
            },
            compute=_actor_pool(config.concurrency),
            **model_remote_args(num_gpus),
        )
        .map_batches(
            write_batch,  # type: ignore[arg-type]
            batch_size=config.rows_per_file,
            batch_format="numpy",
            fn_kwargs={
                "staging_uri": staging_uri(config.output, prepared.run_id),
                "storage_options": options,
                "metadata": metadata,
            },
            num_cpus=config.decode_cpus,
        )
    )


def model_remote_args(num_gpus: float) -> dict[str, Any]:
    """Ray options of the model stage's actors.

    A CPU actor reserves one CPU (its threads use the node's cores, see ResNet50Embedder) and
    starts with ``CPU_ACTOR_ENV``; Ray merges those variables into the job's runtime_env.
    """
    if num_gpus > 0:
        return {"num_gpus": num_gpus, "num_cpus": 0}
    return {"num_gpus": 0, "num_cpus": 1, "runtime_env": {"env_vars": dict(CPU_ACTOR_ENV)}}


def _root_cause(exc: BaseException) -> str:
    """One line naming the error under Ray's wrappers.

    A task's exception reaches the driver as text inside RayTaskError; Python prints a chain
    innermost first, so the first ``SomeError: message`` line that is not Ray's is the cause.
    """
    for line in str(exc).splitlines():
        line = line.strip()
        if re.match(r"^[\w.]+(Error|Exception): ", line) and not line.startswith(
            ("ray.", "UserCodeException")
        ):
            return line[:300]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _actor_pool(concurrency: int | tuple[int, int]) -> Any:
    import ray

    if isinstance(concurrency, int):
        return ray.data.ActorPoolStrategy(size=concurrency)
    return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])


def _num_gpus(config: EmbedConfig) -> float:
    import ray

    if config.num_gpus is not None:
        return config.num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _model_block(prepared: PreparedRun) -> dict[str, Any]:
    config = prepared.config
    return {
        "name": "resnet50",
        "weights": prepared.weights.name,
        "weights_sha256": prepared.weights.sha256,
        "embedding_dim": EMBEDDING_DIM,
        "embedding_dtype": "float32",
        "normalized": config.normalize,
        "precision": config.precision if _num_gpus(config) > 0 else "fp32",
    }


def _check_same_model(
    previous: dict[str, Any], model: dict[str, Any], preprocessing: dict[str, Any], output: str
) -> None:
    """Refuse to mix vectors of different models or preprocessing in one table."""
    before = previous.get("model", {})
    for key in ("weights_sha256", "normalized", "embedding_dim"):
        if before.get(key) != model[key]:
            raise PipelineError(
                f"{output} holds embeddings with {key}={before.get(key)!r}, this run would "
                f"write {key}={model[key]!r}: pass --full to replace them, or use another output"
            )
    if previous.get("preprocessing") != json.loads(json.dumps(preprocessing)):
        raise PipelineError(
            f"{output} holds embeddings made with other preprocessing "
            f"({previous.get('preprocessing', {}).get('mode')!r}): pass --full to replace "
            "them, or use another output"
        )


def _check_output_writable(fs: Any, root: str, uri: str) -> None:
    probe = f"{root}/{WRITE_PROBE}"
    try:
        if is_local(fs):
            fs.makedirs(root, exist_ok=True)
        # On object stores no makedirs: s3fs would create a missing bucket.
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except (OSError, PermissionError) as exc:
        raise PipelineError(f"cannot write to output {uri}: {one_line(exc)}") from None


def _utc_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
