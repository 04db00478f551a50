"""One run, put together once: check what can fail fast, read the output once, diff, plan, commit.

    prepare_run   input and output resolved and checked, weights loaded and checked (no Ray)
    execute_run   snapshot -> same model? -> list_new_images -> run_plan(…, RunSink) -> RunRecord

The objects built here (the ``Output``, its ``Snapshot``, the ``ModelIdentity``) are handed to
the stages that need them; nothing downstream re-derives them from the config.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.checks import (
    Paths,
    check_cpu_actors_fit,
    check_decode_device,
    check_paths,
    check_run,
    check_same_model,
    model_difference,
    resolve_num_gpus,
    started_local_ray,
)
from pipeline.config import EmbedConfig
from pipeline.embed import ResNet50Embedder
from pipeline.incremental import (
    NewImages,
    committed_images,
    list_new_images,
)
from pipeline.inventory import InputList
from pipeline.listing import IMAGE_EXTENSIONS, InputError, ListingCounts
from pipeline.manifest import ModelIdentity, RunRecord, new_run_id, utc_iso
from pipeline.output import Output, Snapshot
from pipeline.preprocessing import PreprocessSpec, preprocess_spec
from pipeline.progress import ProgressMode
from pipeline.report import DryRun
from pipeline.storage import (
    one_line,
)
from pipeline.weights import ResolvedWeights, load_weights

if TYPE_CHECKING:
    from pipeline.feed import StreamedListing
    from pipeline.sink import RunSink

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """A run checked and ready: its input, output, weights and preprocessing; no Ray needed."""

    config: EmbedConfig
    run_id: str
    started: float
    started_at: str
    input_fs: Any
    input_root: str
    input_uri: str
    output: Output
    weights: ResolvedWeights
    spec: PreprocessSpec


def prepare_run(
    config: EmbedConfig,
    *,
    paths: Paths | None = None,
    run_id: str | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> PreparedRun:
    """Check everything that can fail fast, before any data moves.

    Resolves input and output, refuses an output inside the input, checks the output is
    writable, then loads and checks the weights (checksum, ResNet50 shape).

    Args:
        config: The run's knobs.
        paths: What :func:`check_run` returned, when the caller has checked already.
        run_id: Override the generated run id.
        meanwhile: Called in this thread once the input and output checks pass, while the
            weights load in another (the CLI starts Ray there: the two take seconds each).

    Raises:
        PipelineError: with one line saying what to fix.
    """
    started, started_at = time.time(), utc_iso()
    options = config.fs_options()
    in_fs, in_root, input_uri, output = paths or check_run(config)
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
        output=output,
        weights=weights,
        spec=preprocess_spec(config.resize, jpeg_draft=config.jpeg_draft),
    )


def execute_run(
    prepared: PreparedRun,
    *,
    snapshot: Snapshot | None = None,
    listing: NewImages | None = None,
    embedder: type[ResNet50Embedder] = ResNet50Embedder,
    progress: ProgressMode = "none",
) -> RunRecord:
    """List, embed, write and commit a prepared run on the running Ray.

    Args:
        prepared: From :func:`prepare_run`.
        snapshot: The output as the caller already read it (default: read it now). The
            commit refuses if another run has committed since.
        listing: The input as a :func:`probe_run` listed it against ``snapshot``, its new
            images held in the driver (default: list it now).
        embedder: The model stage's class (a subclass may wrap it, e.g. to inject faults).
        progress: Show the images done while it runs: ``auto``, ``bar``, ``log`` or ``none``.

    Returns:
        The committed run's record.

    Raises:
        PipelineError: nothing is committed, or only ``errors/`` (``ErrorRateExceededError``).
    """
    import ray

    from pipeline.plan import run_plan
    from pipeline.sink import RunBooks, RunSink

    config, output = prepared.config, prepared.output
    timings = {"start-up": time.time() - prepared.started}  # checks, weights, Ray
    started_listing = time.time()
    snapshot = snapshot or output.snapshot()
    num_gpus = resolve_num_gpus(config)
    check_decode_device(config, num_gpus)
    check_cpu_actors_fit(
        config, num_gpus, ray.cluster_resources().get("CPU", 0.0), fixed=started_local_ray()
    )
    if num_gpus == 0 and config.calls_per_actor > 1:
        logger.warning(
            "--calls-per-actor %d on CPU model actors: that many forward passes share the "
            "node's cores at once (one already uses them all)",
            config.calls_per_actor,
        )
    model = ModelIdentity(
        weights=prepared.weights.name,
        weights_sha256=prepared.weights.sha256,
        normalized=config.normalize,
        # CPU actors compute fp32, or bf16 where asked for (they refuse it on CPUs without
        # native bf16), and the output says so.
        precision=config.precision if num_gpus > 0 or config.precision == "bf16" else "fp32",
    )
    preprocessing = prepared.spec.to_metadata()
    manifest = snapshot.manifest
    incremental = manifest is not None and not config.full
    if manifest is not None and (incremental or config.limit is not None):
        check_same_model(manifest, model, preprocessing, output.uri, limited_full=config.full)
    # A --full run of the same model as a killed one's pending checkpoints takes them up.
    resume = (
        manifest is not None
        and config.full
        and manifest.pending is not None
        and manifest.pending.matches(model, preprocessing)
    )
    streamed = None
    if listing is None:
        # The listing streams into the plan from a driver thread; the run starts with its
        # first chunk of new images (or settles at once if it ends without one).
        from pipeline.feed import StreamedListing

        streamed = StreamedListing(
            lambda keep: list_work(
                prepared.input_fs,
                prepared.input_root,
                prepared.input_uri,
                output,
                snapshot if incremental or resume else None,
                config,
                keep=keep,
                in_ray=True,
                pending=resume,
            )
        )
        if not streamed.start():  # nothing new: the books are complete already
            try:
                listing = streamed.result()
            finally:
                streamed.cancel()
            streamed = None
    else:  # a probe's: its chunks go to the object store now
        listing = dataclasses.replace(listing, refs=[ray.put(chunk) for chunk in listing.refs])
    timings["listing"] = time.time() - started_listing  # streamed: until the first chunk
    if listing is not None:
        log_listing(listing, prepared.input_uri)
    else:  # settled from the listing's own books once every block is written
        listing = NewImages(
            refs=[],
            counts=ListingCounts(),
            unchanged=0,
            known_failures={},
            deleted=pa.array([], pa.string()),
        )
    books = RunBooks(
        run_id=prepared.run_id,
        input_uri=prepared.input_uri,
        output=output,
        snapshot=snapshot,
        model=model,
        preprocessing=preprocessing,
        listing=listing,
        config=config,
        started=prepared.started,
        started_at=prepared.started_at,
    )
    if streamed is None:
        books.refuse_known_failures()  # streamed: known only at the end, checked then
    sink = RunSink(books)
    try:
        if streamed is not None:
            sink.listing_done = streamed.result
            streamed.written = lambda: sink.rows_written
            run_streamed(streamed, sink, prepared, model, num_gpus, embedder, progress)
        elif listing.refs:
            run_plan(
                listing.refs,
                sink,
                total=listing.to_embed,
                progress=progress,
                config=config,
                spec=prepared.spec,
                weights=prepared.weights,
                model=model,
                num_gpus=num_gpus,
                embedder=embedder,
            )
        else:
            sink.run_without_tasks()
    finally:
        if sink.record is not None:  # committed, or only its errors were (exit 3)
            write_run_report(output, config, sink, timings)
    assert sink.record is not None  # set by on_write_complete, or it raised
    return sink.record


def run_streamed(
    streamed: StreamedListing,
    sink: RunSink,
    prepared: PreparedRun,
    model: ModelIdentity,
    num_gpus: float,
    embedder: type[ResNet50Embedder],
    progress: ProgressMode,
) -> None:
    """:func:`run_plan` over a listing that goes on while it runs; a failed listing's own
    error is the one raised."""
    from pipeline.plan import run_plan

    try:
        run_plan(
            streamed.datasource(),
            sink,
            total=lambda: streamed.result().to_embed if streamed.done else None,
            progress=progress,
            config=prepared.config,
            spec=prepared.spec,
            weights=prepared.weights,
            model=model,
            num_gpus=num_gpus,
            embedder=embedder,
        )
    except BaseException:
        failed = streamed.failed  # before the cancel: then a waiting listing fails too
        streamed.cancel()
        if failed:
            streamed.result()  # the listing's own error is the one raised
        raise
    streamed.cancel()  # done: the feed actor goes
    log_listing(streamed.result(), prepared.input_uri)


def log_listing(listing: NewImages, input_uri: str) -> None:
    # DEBUG: the progress display and the summary say the same.
    counts = listing.counts
    logger.debug(
        "listed %d images under %s: %d new or changed, %d unchanged, %d known failed, "
        "%d gone, %d skipped",
        counts.listed,
        input_uri,
        listing.to_embed,
        listing.unchanged,
        listing.known_failed,
        len(listing.deleted),
        counts.skipped_by_extension,
    )


def write_run_report(
    output: Output, config: EmbedConfig, sink: RunSink, timings: dict[str, float]
) -> None:
    """``OUTPUT/_reports/RUN_ID.json`` and ``.html``; a report that cannot be written is a
    warning, never a failed run (the run has committed by then)."""
    from pipeline.report import config_for_report, report_html, run_report, throughput_samples

    assert sink.record is not None
    report = run_report(
        sink.record,
        output=output.uri,
        config=config_for_report(config),
        timings=timings | sink.timings,
        throughput=throughput_samples(sink.written, sink.timings.get("execution", 0.0)),
    )
    try:
        output.write_report(sink.record.run_id, report, report_html(report))
    except OSError as exc:
        logger.warning("run report not written: %s", one_line(exc))


def list_work(
    fs: Any,
    root: str,
    input_uri: str,
    output: Output,
    snapshot: Snapshot | None,
    config: EmbedConfig,
    *,
    keep: Callable[[Any], Any] | None,
    max_listed: int | None = None,
    in_ray: bool = False,
    pending: bool = False,
) -> NewImages:
    """List the input against ``snapshot``'s current tables (``None``: embed everything;
    ``pending``: against a killed ``--full`` run's pending files, which this one resumes).

    An ``--input-list`` is read by Ray Data where ``in_ray`` (a run), else in this process
    (a dry run, or a small run's probe, which start no Ray)."""
    listing = list_new_images(
        fs,
        root,
        # Only the index is kept: the tables it was built from go before the listing starts.
        known=(
            committed_images(output, snapshot, pending=pending) if snapshot is not None else None
        ),
        keep=keep,
        limit=config.limit,
        max_listed=max_listed,
        concurrency=config.list_concurrency,
        tables=_list_tables(config, input_uri, in_ray=in_ray) if config.input_list else None,
    )
    if listing.counts.listed == 0:
        raise InputError(
            f"no images under {input_uri} ({listing.counts.skipped_by_extension} other files "
            f"skipped; images end in .{', .'.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return listing


def _list_tables(config: EmbedConfig, input_uri: str, *, in_ray: bool) -> Iterator[pa.Table]:
    assert config.input_list is not None
    listed = InputList.open(config.input_list, input_uri, config.fs_options())
    if not in_ray:
        return listed.tables()
    from pipeline.feed import read_list

    return read_list(listed)


def dry_run(config: EmbedConfig) -> DryRun:
    """List the input and diff it against the committed tables; start no Ray, load no weights.

    The model check compares what is known without loading weights: their name (an ImageNet
    or random source, or the file's path: a file is not hashed), normalization and the
    preprocessing; a real run compares the weights' sha256 instead of their name.
    """
    in_fs, in_root, input_uri, output = check_paths(config)
    snapshot = output.snapshot()
    manifest = snapshot.manifest
    incremental = manifest is not None and not config.full
    limited_full = manifest is not None and config.full and config.limit is not None
    refusal = model_difference(config, snapshot, output) if incremental or limited_full else None
    listing = list_work(
        in_fs, in_root, input_uri, output, snapshot if incremental else None, config, keep=None
    )
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


@dataclasses.dataclass(frozen=True)
class Probe:
    """The input listed and diffed before Ray starts; its new images held in the driver."""

    input_uri: str
    output: Output
    snapshot: Snapshot
    listing: NewImages
    started: float
    started_at: str


def probe_run(
    config: EmbedConfig,
    paths: Paths,
    *,
    snapshot: Snapshot | None = None,
    max_listed: int = PROBE_LISTED,
) -> Probe | None:
    """List and diff an input of at most ``max_listed`` images without Ray or weights.

    Args:
        config: The run's knobs.
        paths: From :func:`check_run`.
        snapshot: The output as the caller already read it (default: read it now).
        max_listed: Give up on larger inputs.

    Returns:
        The probe; ``None`` when the input is larger, or when there is nothing to embed but
        the table's model may differ (then the run loads the weights and compares sha256s).
    """
    started, started_at = time.time(), utc_iso()
    in_fs, in_root, input_uri, output = paths
    snapshot = snapshot or output.snapshot()
    if config.full and snapshot.manifest is not None and snapshot.manifest.pending is not None:
        return None  # it may resume pending files: the run decides, with the model known
    incremental = snapshot.manifest is not None and not config.full
    listing = list_work(
        in_fs,
        in_root,
        input_uri,
        output,
        snapshot if incremental else None,
        config,
        keep=lambda chunk: chunk,
        max_listed=max_listed,
    )
    if not listing.complete:
        return None
    # Only a run with nothing to embed is decided here; one with work checks the model with
    # its weights loaded (and the import of torchvision overlaps Ray's start there).
    if listing.to_embed == 0 and incremental:
        if model_difference(config, snapshot, output) is not None:
            return None
    return Probe(input_uri, output, snapshot, listing, started, started_at)


def commit_without_work(
    config: EmbedConfig, probe: Probe, *, run_id: str | None = None
) -> RunRecord:
    """Commit a run that has nothing to embed (deletions are still recorded), without Ray or
    weights: its model is the table's, which it adds no vector to."""
    from pipeline.sink import RunBooks, RunSink

    manifest = probe.snapshot.manifest
    assert manifest is not None and manifest.model is not None  # nothing new: a table exists
    books = RunBooks(
        run_id=run_id or new_run_id(),
        input_uri=probe.input_uri,
        output=probe.output,
        snapshot=probe.snapshot,
        model=manifest.model,
        preprocessing=manifest.preprocessing or {},
        listing=probe.listing,
        config=config,
        started=probe.started,
        started_at=probe.started_at,
    )
    books.refuse_known_failures()
    sink = RunSink(books)
    try:
        return sink.run_without_tasks()
    finally:
        if sink.record is not None:
            write_run_report(probe.output, config, sink, {"start-up": 0.0})
