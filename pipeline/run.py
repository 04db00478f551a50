"""One run, from its checked :class:`~pipeline.checks.Run` to its committed record.

    check_run     input, output and weights file checked: the Run      (pipeline.checks)
    read_output   the output's snapshot, read once, under the run's lease
    probe_run     a small input listed and diffed, without Ray or weights
    prepare_run   the weights loaded and checked (no Ray)
    execute_run   placed on Ray -> same model? -> list_work -> run_plan(run, …) -> RunRecord

Every step takes the one ``Run``; nothing downstream derives its input, output, weights or
model again from the config.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.checks import Run, check_run, diff_base, model_difference, placed
from pipeline.config import EmbedConfig
from pipeline.embed import ResNet50Embedder
from pipeline.incremental import NewImages, list_work
from pipeline.manifest import Manifest, RunRecord
from pipeline.output import Snapshot
from pipeline.probe import pick_probes
from pipeline.progress import ProgressMode
from pipeline.report import DryRun, write_run_report
from pipeline.reuse import content_index
from pipeline.stop import Drain
from pipeline.weights import load_weights

logger = logging.getLogger(__name__)


def read_output(run: Run, snapshot: Snapshot | None = None) -> Run:
    """The run with the output's snapshot (``snapshot``, as the caller read it, or read now):
    the version its commits compare against. Read under the run's lease."""
    return dataclasses.replace(run, snapshot=snapshot or run.output.snapshot())


def prepare_run(run: Run | EmbedConfig, *, meanwhile: Callable[[], None] | None = None) -> Run:
    """The run with its weights loaded and checked (checksum, ResNet50 shape), and its output
    read (:func:`read_output`) unless it was; no Ray needed.

    Args:
        run: From :func:`~pipeline.checks.check_run`; a config is checked first.
        meanwhile: Called in this thread while the weights load in another (the CLI starts
            Ray there: the two take seconds each).

    Raises:
        PipelineError: with one line saying what to fix.
    """
    if isinstance(run, EmbedConfig):
        run = check_run(run)
    config = run.config
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weights") as pool:
        loading = pool.submit(
            load_weights,
            config.weights,
            sha256=config.weights_sha256,
            seed=config.seed,
            storage_options=config.fs_options(),
        )
        if meanwhile is not None:
            meanwhile()
        weights = loading.result()
    if run.snapshot is None:
        run = read_output(run)
    return dataclasses.replace(run, weights=weights)


def execute_run(
    run: Run,
    *,
    listing: NewImages | None = None,
    embedder: type[ResNet50Embedder] = ResNet50Embedder,
    progress: ProgressMode = "none",
    drain: Drain | None = None,
) -> RunRecord:
    """List, embed, write and commit a prepared run on the running Ray.

    Args:
        run: From :func:`prepare_run`. The commit refuses if another run has committed since
            its snapshot was read.
        listing: The input as :func:`probe_run` listed it, its new images held in the driver
            (default: list it now, streaming into the plan).
        embedder: The model stage's class (a subclass may wrap it, e.g. to inject faults).
        progress: Show the images done while it runs: ``auto``, ``bar``, ``log`` or ``none``.
        drain: Set by a SIGTERM's handler (:mod:`pipeline.stop`): the run then stops feeding
            and keeps what its writers finish as checkpoints before it stops.

    Returns:
        The committed run's record.

    Raises:
        PipelineError: nothing is committed, or only ``errors/`` (``ErrorRateExceededError``);
            ``QualityGateError``: a vector with a NaN or an infinity came back, nothing more
            is committed.
    """
    from pipeline.feed import feeding, start_listing
    from pipeline.plan import run_plan
    from pipeline.sink import RunBooks, RunSink

    timings = {"start-up": time.time() - run.started}  # checks, probe, weights, Ray
    started_listing = time.time()
    run = placed(run)
    base, resume = diff_base(run)  # the model check: same model as the table?
    table = None if resume or run.config.full else base  # what the run adds to
    run = dataclasses.replace(
        run,
        content=index_content(run, table),
        probes=tuple(
            pick_probes(run.output.uri, table, run.config.probe, run.output.storage_options)
            if table is not None
            else ()
        ),
    )
    listing, streamed = start_listing(run, base, resume, probed=listing)
    timings["listing"] = time.time() - started_listing  # streamed: until the first chunk
    books = RunBooks(run, run.model, run.preprocessing, listing)
    if streamed is None:
        books.refuse_known_failures()  # streamed: known only at the end, checked then
    sink = RunSink(books, drain)
    try:
        if streamed is None and not books.listing.refs:
            sink.run_without_tasks()
        else:
            sink.probes_expected = len(run.probes)  # fed first, once there is work
            with feeding(books.listing, streamed, sink) as (source, total), sink.watching_drain():
                run_plan(run, source, sink, total=total, embedder=embedder, progress=progress)
    finally:
        if sink.record is not None:  # committed, or only its errors were (exit 3)
            write_run_report(run, sink, timings)
    assert sink.record is not None  # set by on_write_complete, or it raised
    return sink.record


def index_content(run: Run, base: Manifest | None) -> Any:
    """The table's content index in the object store, for reuse by content
    (:mod:`pipeline.reuse`); ``None`` where there is no table to add to, or ``--reuse off``."""
    import ray

    config = run.config
    files = base.current.get("embeddings", []) if base is not None else []
    if config.reuse == "off" or not files:
        return None
    started = time.time()
    output = run.output
    index = content_index(output.uri, files, output.storage_options, by_etag=config.reuse == "etag")
    logger.info(
        "indexed %d stored images by content (%d by ETag) from %d files in %.1f s",
        len(index),
        len(index.etags),
        len(files),
        time.time() - started,
    )
    return ray.put(index) if len(index) else None


def dry_run(config: EmbedConfig) -> DryRun:
    """List the input and diff it against the committed tables; start no Ray, load no weights.

    The model check compares what is known without loading weights: their name (an ImageNet
    or random source, or the file's path: a file is not hashed), normalization and the
    preprocessing; a real run compares the weights' sha256 instead of their name.
    """
    run = read_output(check_run(config, writes=False))
    assert run.snapshot is not None
    manifest = run.snapshot.manifest
    incremental = manifest is not None and not config.full
    limited_full = manifest is not None and config.full and config.limit is not None
    refusal = model_difference(run) if incremental or limited_full else None
    listing = list_work(run, manifest if incremental else None, keep=None)
    if refusal is None:
        from pipeline.sink import error_rate_verdict

        # The best case: every image to embed embeds. Worse cases are known only by running.
        verdict = error_rate_verdict(
            {},
            unaccepted=listing.unaccepted_failures,
            to_embed=listing.to_embed,
            max_error_rate=config.max_error_rate,
        )
        if verdict:
            refusal = f"{verdict}: the run would exit 3 (fix or remove those images)"
    rates = [r.embedding_images_per_second for r in (manifest.runs if manifest else ())]
    rates = [r for r in rates if r > 0]
    return DryRun(
        listing=listing,
        seconds_per_image=1 / rates[-1] if rates else None,
        refusal=refusal,
    )


# Listed keys a run holds in the driver before it starts Ray: a run whose input fits finds out
# first whether there is anything to embed; a larger one lists again, under Ray.
PROBE_LISTED = 100_000


def probe_run(run: Run, *, max_listed: int = PROBE_LISTED) -> NewImages | None:
    """List and diff an input of at most ``max_listed`` images without Ray or weights.

    Args:
        run: From :func:`read_output`.
        max_listed: Give up on larger inputs.

    Returns:
        The listing, its new images held in the driver; ``None`` when the input is larger, or
        when there is nothing to embed but the table's model may differ (then the run loads
        the weights and compares sha256s).
    """
    config, snapshot = run.config, run.snapshot
    assert snapshot is not None, "read_output reads the output first"
    if config.full and snapshot.manifest is not None and snapshot.manifest.pending is not None:
        return None  # it may resume pending files: the run decides, with the model known
    incremental = snapshot.manifest is not None and not config.full
    listing = list_work(
        run,
        snapshot.manifest if incremental else None,
        keep=lambda chunk: chunk,
        max_listed=max_listed,
    )
    if not listing.complete:
        return None
    # Only a run with nothing to embed is decided here; one with work checks the model with
    # its weights loaded (and the import of torchvision overlaps Ray's start there).
    if listing.to_embed == 0 and incremental:
        if model_difference(run) is not None:
            return None
    return listing


def commit_without_work(run: Run, listing: NewImages) -> RunRecord:
    """Commit a run that has nothing to embed (deletions are still recorded), without Ray or
    weights: its model is the table's, which it adds no vector to."""
    from pipeline.sink import RunBooks, RunSink

    manifest = run.snapshot.manifest if run.snapshot else None
    assert manifest is not None and manifest.model is not None  # nothing new: a table exists
    books = RunBooks(run, manifest.model, manifest.preprocessing or {}, listing)
    books.refuse_known_failures()
    sink = RunSink(books)
    try:
        return sink.run_without_tasks()
    finally:
        if sink.record is not None:
            write_run_report(run, sink, {"start-up": time.time() - run.started})
