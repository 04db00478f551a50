"""The wiring: one Ray Data plan from listing to committed Parquet.

list (driver, streaming) -> decode_batch (CPU tasks) -> ResNet50Embedder (actor pool)
-> write_batch (CPU tasks, into staging) -> commit_run (driver: move, then manifest last).
This module uses Ray but never starts it: the entry points start or join a cluster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import uuid
from typing import Any

from pipeline.config import EmbedConfig, PipelineError
from pipeline.decode import decode_batch
from pipeline.embed import EMBEDDING_DIM, ResNet50Embedder
from pipeline.listing import IMAGE_EXTENSIONS, InputError, ListingCounts, list_images
from pipeline.manifest import commit_run, discard_uncommitted, staging_uri
from pipeline.preprocessing import PreprocessSpec, preprocess_spec
from pipeline.storage import open_fs, to_uri
from pipeline.weights import ResolvedWeights, load_weights
from pipeline.write import file_metadata, write_batch

logger = logging.getLogger(__name__)

# Listing rows per Ray Data block: small enough that a few dozen images still spread over
# several decode tasks, large enough that ten million keys stay a few ten thousand refs.
LISTING_BLOCK_ROWS = 256

# s3fs words S3 throttling this way; Ray's default retried I/O errors do not match it.
RETRIED_IO_ERRORS = ("Please reduce your request rate", "SlowDown")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    run_id: str
    output: str
    listed: int
    skipped_by_extension: int
    embedded: int
    failed: int
    wall_seconds: float

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


def prepare_run(config: EmbedConfig, *, run_id: str | None = None) -> PreparedRun:
    """Check everything that can fail fast, before Ray starts and before any data moves.

    Resolves input and output, refuses an output inside the input, checks the output is
    writable, and loads and checks the weights (checksum, ResNet50 shape).

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
    if not in_fs.exists(in_root):
        raise InputError(f"input not found: {input_uri}")
    weights = load_weights(
        config.weights, sha256=config.weights_sha256, seed=config.seed, storage_options=options
    )
    _check_output_writable(out_fs, out_root, output_uri)
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


def execute_run(prepared: PreparedRun) -> RunSummary:
    """List, embed, write and commit a prepared run on the running Ray."""
    import ray

    config, run_id, spec, weights = (
        prepared.config,
        prepared.run_id,
        prepared.spec,
        prepared.weights,
    )
    in_fs, in_root, input_uri = prepared.input_fs, prepared.input_root, prepared.input_uri
    output_uri, started, started_at = prepared.output_uri, prepared.started, prepared.started_at
    options = config.fs_options()
    discard_uncommitted(config.output, storage_options=options)

    counts = ListingCounts()
    # Each chunk goes to the object store as it is listed: the driver never holds the listing.
    refs = [
        ray.put(chunk)
        for chunk in list_images(
            in_fs, in_root, counts, chunk_rows=LISTING_BLOCK_ROWS, limit=config.limit
        )
    ]
    if counts.listed == 0:
        raise InputError(
            f"no images under {input_uri} ({counts.skipped_by_extension} other files skipped; "
            f"images end in .{', .'.join(sorted(IMAGE_EXTENSIONS))})"
        )
    logger.info(
        "listed %d images (%d skipped) under %s",
        counts.listed,
        counts.skipped_by_extension,
        input_uri,
    )

    context = ray.data.DataContext.get_current()
    for message in RETRIED_IO_ERRORS:
        if message not in context.retried_io_errors:
            context.retried_io_errors.append(message)

    num_gpus = config.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    precision = config.precision if num_gpus > 0 else "fp32"
    model_block = {
        "name": "resnet50",
        "weights": weights.name,
        "weights_sha256": weights.sha256,
        "embedding_dim": EMBEDDING_DIM,
        "embedding_dtype": "float32",
        "normalized": config.normalize,
        "precision": precision,
    }
    from pipeline import __version__

    metadata = file_metadata(
        run_id=run_id,
        weights=weights.to_metadata(),
        preprocessing=spec.to_metadata(),
        normalized=config.normalize,
        pipeline_version=__version__,
    )

    stage = staging_uri(config.output, run_id)
    dataset = (
        # Ray's annotations reject keyword-only UDFs and plain ObjectRef lists: hence the ignores.
        ray.data.from_arrow_refs(refs)  # type: ignore[arg-type]
        .map_batches(
            decode_batch,  # type: ignore[arg-type]
            batch_size=config.decode_batch_size,
            batch_format="numpy",
            fn_kwargs={
                "spec": spec,
                "storage_options": options,
                "max_image_pixels": config.max_image_pixels,
            },
            num_cpus=1,
            # A memory reservation bounds concurrent decodes by RAM, and, being a remote arg
            # the model stage lacks, it also stops Ray from fusing decode into the model actor,
            # where it would run serially with the forward passes.
            memory=config.decode_memory,
        )
        .map_batches(
            ResNet50Embedder,
            batch_size=config.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "state_dict": weights.state_dict,
                "mean": spec.mean,
                "std": spec.std,
                "precision": precision,
                "normalize": config.normalize,
                "num_threads": config.model_threads,
            },
            concurrency=config.concurrency,
            num_gpus=num_gpus,
            num_cpus=1 if num_gpus == 0 else 0,
        )
        .map_batches(
            write_batch,  # type: ignore[arg-type]
            batch_size=config.rows_per_file,
            batch_format="numpy",
            fn_kwargs={"staging_uri": stage, "storage_options": options, "metadata": metadata},
            num_cpus=1,
        )
    )
    written = dataset.take_all()
    staged: dict[str, list[str]] = {"embeddings": [], "errors": []}
    rows = {"embeddings": 0, "errors": 0}
    for row in written:
        staged[str(row["table"])].append(str(row["path"]))
        rows[str(row["table"])] += int(row["rows"])
    if rows["embeddings"] + rows["errors"] != counts.listed:
        # Every listed image must come out exactly once, embedded or failed; anything else
        # is a bug or a fault we must not commit.
        raise PipelineError(
            f"run {run_id} produced {rows['embeddings']} embeddings + {rows['errors']} errors "
            f"for {counts.listed} listed images; nothing committed"
        )

    wall = time.time() - started
    summary = RunSummary(
        run_id=run_id,
        output=output_uri,
        listed=counts.listed,
        skipped_by_extension=counts.skipped_by_extension,
        embedded=rows["embeddings"],
        failed=rows["errors"],
        wall_seconds=wall,
    )
    run_record: dict[str, Any] = {
        "run_id": run_id,
        "input": input_uri,
        "started_at": started_at,
        "finished_at": _utc_iso(),
        "wall_seconds": round(wall, 3),
        "images_per_second": round(summary.images_per_second, 3),
        "counts": {
            "listed": counts.listed,
            "skipped_by_extension": counts.skipped_by_extension,
            "embedded": summary.embedded,
            "failed": summary.failed,
        },
        "pipeline_version": __version__,
        "model": model_block,
        "preprocessing": spec.to_metadata(),
    }
    commit_run(config.output, run=run_record, staged=staged, storage_options=options)
    return summary


def _check_output_writable(fs: Any, root: str, uri: str) -> None:
    probe = f"{root}/{STAGING_PROBE}"
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except (OSError, PermissionError) as exc:
        raise PipelineError(
            f"cannot write to output {uri}: {' '.join(str(exc).split())[:200]}"
        ) from None


STAGING_PROBE = "_write_probe"


def _utc_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
