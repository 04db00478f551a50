"""The wiring: one Ray Data plan from listing chunks to a committed run.

listing chunks (object store) -> decode_batch (CPU tasks) -> ResNet50Embedder (actor pool)
-> write_files (writer tasks into staging) -> RunSink (checkpoint commits in the driver as the
writers finish; the last once every task is done).
This module uses Ray but never starts it: the entry points start or join a cluster.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.config import PipelineError
from pipeline.decode import TRANSIENT_READ_ERROR, decode_batch, fetch_batch
from pipeline.embed import CPU_ACTOR_ENV, ResNet50Embedder
from pipeline.nodes import watching_nodes
from pipeline.progress import (
    ProgressDisplay,
    ProgressMode,
    counter_actor,
    read_counter,
    reporting,
)
from pipeline.storage import RETRIED_IO_ERRORS
from pipeline.write import write_files

if TYPE_CHECKING:
    from pipeline.checks import Run
    from pipeline.feed import FeedDatasource
    from pipeline.sink import RunSink

# Task-level retries of a stage after s3fs's and botocore's own retries are spent.
MAX_MAP_RETRIES = 2
# Bytes a plan's blocks hold at most (Ray's default: 128 MiB). A task that runs as long as
# the listing (the feed's read) hands its rows on only in blocks of this size, so a smaller
# block lets decoding start sooner. A decode task's output (256 images of 224 x 224 x 3)
# still stays one block: Ray slices a block only past 1.5x this.
PLAN_BLOCK_BYTES = 32 * 2**20
# Blocks a running task may hand on before Ray Data takes them (Ray's default: 2). The
# repartition task splits each listing block into hundreds of decode-sized blocks; two at a
# time would hand them on far slower than decode takes them.
TASK_BLOCKS_AHEAD = 64


def run_plan(
    run: Run,
    source: list[Any] | FeedDatasource,
    sink: RunSink,
    *,
    total: int | Callable[[], int | None],
    embedder: type[ResNet50Embedder] = ResNet50Embedder,
    progress: ProgressMode = "none",
) -> None:
    """Decode, embed and write the listed images into ``sink``, which commits at the end.

    Args:
        run: The run, placed on Ray (:func:`pipeline.checks.placed`): its knobs, resize spec,
            weights (shipped to each model actor), model identity and GPUs per actor.
        source: Listing chunks (Arrow tables) in the object store, or a datasource that
            yields them while the input is still being listed (:mod:`pipeline.feed`).
        sink: The run's writes and commit.
        total: Images to embed, or what returns it once known (for the progress display).
        embedder: The model stage's class (a subclass may wrap it, e.g. to inject faults).
        progress: How to show the images done while it runs (see :mod:`pipeline.progress`).

    Raises:
        PipelineError: a stage failed beyond Ray's retries; nothing is committed.
    """
    import ray

    retry_io_errors(ray.data.DataContext.get_current())
    # The model stage's batches, counted: for the progress display, and as the sign of life
    # that the watch on lost nodes looks for.
    counter = counter_actor()
    results = plan_dataset(run, source, sink, embedder, counter)
    sink.start()
    sink.executing_since = time.time()
    try:
        with contextlib.ExitStack() as stack:
            done = functools.partial(read_counter, counter)
            if progress != "none":
                stack.enter_context(ProgressDisplay(done, total=total, mode=progress))
            stack.enter_context(watching_nodes(sink.drain, done))
            # The writers' results reach the driver as each task finishes: the sink commits
            # a checkpoint every --commit-every images, and the rest at the end.
            sink.consume(
                text
                for batch in results.iter_batches(batch_size=None, batch_format="numpy")
                for text in batch["staged"]
            )
    except ray.exceptions.RayError as exc:
        # A stage failed beyond Ray's retries (e.g. the output store is down): the staging
        # files are not committed; the next run discards them.
        raise PipelineError(f"the pipeline failed, {sink.kept()}: {_root_cause(exc)}") from None


def retry_io_errors(context: Any) -> None:
    """Ray Data retries our stages' transient I/O errors.

    Our stages do their own I/O inside map tasks, where Ray Data retries only the user errors
    listed here. Retrying is safe: decode is pure, and a retried writer's files get new names
    and are never committed.
    """
    for message in RETRIED_IO_ERRORS:
        if message not in context.retried_io_errors:
            context.retried_io_errors.append(message)
    context.retried_map_errors = [*RETRIED_IO_ERRORS, TRANSIENT_READ_ERROR]
    context.max_map_retries = MAX_MAP_RETRIES


def plan_dataset(
    run: Run,
    source: list[Any] | FeedDatasource,
    sink: RunSink,
    embedder: type[ResNet50Embedder],
    counter: Any,
) -> Any:
    """The lazy dataset from the listing to the writers' results (one JSON text per file
    written, :func:`pipeline.write.write_files`); nothing runs until it is iterated. The model
    stage tells ``counter`` of each batch (:func:`pipeline.progress.reporting`)."""
    import ray

    config = run.config
    first_stage, first_kwargs, model_kwargs = stage_arguments(run)
    model_kwargs |= {"progress": counter, "probes": run.probes}
    listing = (
        # Ray's annotations reject keyword-only UDFs and plain ObjectRef lists: hence the ignores.
        ray.data.from_arrow_refs(source)  # type: ignore[arg-type]
        if isinstance(source, list)
        # The feed's read tasks only wait on the driver: they reserve no CPU. One block per
        # read task asked for: else Ray Data splits each task's whole output, after it ends.
        else ray.data.read_datasource(source, override_num_blocks=source.readers, num_cpus=0)
    )
    size_blocks(listing.context)
    return (
        listing
        # Listing chunks are large (few refs in the driver); split them into decode-sized
        # blocks so decode tasks run in parallel and images stream through the model stage
        # instead of moving in listing-chunk steps.
        .repartition(target_num_rows_per_block=config.decode_batch_size)
        .map_batches(
            first_stage,
            batch_size=config.decode_batch_size,
            batch_format="numpy",
            fn_kwargs=first_kwargs,
            num_cpus=config.decode_cpus,
            # A memory reservation bounds concurrent decodes by RAM, and, being a remote arg
            # the model stage lacks, it also stops Ray from fusing decode into the model actor,
            # where it would run serially with the forward passes.
            memory=config.decode_memory,
        )
        .map_batches(
            reporting(embedder),
            batch_size=model_kwargs["batch_hint"],
            batch_format="numpy",
            fn_constructor_kwargs=model_kwargs,
            compute=_actor_pool(config.concurrency, config.calls_per_actor),
            **model_remote_args(run.num_gpus, config.model_cpus),
        )
        .map_batches(
            write_files,  # type: ignore[arg-type]
            # One writer task per --rows-per-file rows, one file each; never more rows than
            # --commit-every, or a checkpoint would wait for a file larger than it.
            batch_size=min(config.rows_per_file, config.commit_every),
            batch_format="numpy",
            fn_kwargs=sink.writer_kwargs(),
            num_cpus=config.write_cpus,
        )
    )


def stage_arguments(run: Run) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The first stage (decode on CPU tasks, or only read where the model actors decode on
    their GPU), its keyword arguments, and the model actors' constructor arguments."""
    config, spec, model = run.config, run.spec, run.model
    assert run.weights is not None
    model_kwargs: dict[str, Any] = {
        "state_dict": run.weights.as_numpy(),
        "mean": spec.mean,
        "std": spec.std,
        "precision": model.precision,
        "normalize": model.normalized,
        "num_threads": config.model_threads,
        "compile": config.compiles(run.num_gpus),
        "batch_hint": config.model_batch_size(run.num_gpus),
        "concurrent_calls": config.calls_per_actor,
    }
    if config.decode_device == "cuda":
        # The first stage only reads the files; the model actors decode on their GPU.
        model_kwargs |= {"decode_spec": spec, "max_image_pixels": config.max_image_pixels}
        fetch_kwargs = {
            "storage_options": config.fs_options(),
            "reuse": run.content,
            "probes": run.probes,
        }
        return fetch_batch, fetch_kwargs, model_kwargs
    decode_kwargs = {
        "spec": spec,
        "storage_options": config.fs_options(),
        "max_image_pixels": config.max_image_pixels,
        "reuse": run.content,
        "probes": run.probes,
    }
    return decode_batch, decode_kwargs, model_kwargs


def size_blocks(context: Any) -> None:
    """Block sizes of one plan (its own ``DataContext``, not the process's): at most
    ``PLAN_BLOCK_BYTES`` (a smaller size already set is kept), ``TASK_BLOCKS_AHEAD`` blocks
    ahead of Ray Data per task. Ray 2.60 has no per-stage setting for either."""
    limit = context.target_max_block_size
    context.target_max_block_size = min(limit or PLAN_BLOCK_BYTES, PLAN_BLOCK_BYTES)
    # A private field of DataContext; Ray reads it when it plans each task stage.
    context._max_num_blocks_in_streaming_gen_buffer = TASK_BLOCKS_AHEAD


def model_remote_args(num_gpus: float, cpus: float = 1.0) -> dict[str, Any]:
    """Ray options of the model stage's actors.

    A CPU actor reserves ``cpus`` (``--model-cpus``; its threads use the node's cores, see
    ResNet50Embedder) and starts with ``CPU_ACTOR_ENV``; Ray merges those variables into the
    job's runtime_env.
    """
    if num_gpus > 0:
        return {"num_gpus": num_gpus, "num_cpus": 0}
    return {"num_gpus": 0, "num_cpus": cpus, "runtime_env": {"env_vars": dict(CPU_ACTOR_ENV)}}


def _actor_pool(concurrency: int | tuple[int, int], calls: int = 1) -> Any:
    """The model stage's actor pool: ``concurrency`` actors, each running ``calls`` batches at
    once in threads of its own (Ray Data otherwise runs one call of an actor at a time)."""
    import ray

    threads: dict[str, Any] = (
        {}
        if calls == 1
        else {"max_concurrent_calls_per_actor": calls, "enable_true_multi_threading": True}
    )
    if isinstance(concurrency, int):
        return ray.data.ActorPoolStrategy(size=concurrency, **threads)
    return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1], **threads)


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
