"""One run, put together once: check what can fail fast, read the output once, diff, plan, commit.

    prepare_run   input and output resolved and checked, weights loaded and checked (no Ray)
    execute_run   snapshot -> same model? -> list_new_images -> run_plan(…, RunSink) -> RunRecord

The objects built here (the ``Output``, its ``Snapshot``, the ``ModelIdentity``) are handed to
the stages that need them; nothing downstream re-derives them from the config.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa

from pipeline.config import ConfigError, EmbedConfig, PipelineError
from pipeline.embed import ResNet50Embedder
from pipeline.incremental import (
    NewImages,
    list_new_images,
)
from pipeline.inventory import list_tables
from pipeline.listing import IMAGE_EXTENSIONS, InputError, ListingCounts
from pipeline.manifest import Manifest, ModelIdentity, RunRecord
from pipeline.output import Output, Snapshot
from pipeline.preprocessing import PreprocessSpec, preprocess_spec
from pipeline.progress import ProgressMode
from pipeline.storage import (
    RAY_WORKING_DIR,
    is_local,
    one_line,
    open_fs,
    storage_errors,
    to_uri,
    within,
)
from pipeline.weights import ResolvedWeights, load_weights, sniff_checkpoint, weights_name

if TYPE_CHECKING:
    from pipeline.feed import StreamedListing
    from pipeline.sink import RunSink

logger = logging.getLogger(__name__)


def new_run_id(now: dt.datetime | None = None) -> str:
    """A sortable, path-safe run id, e.g. ``20261125T151307Z-3f9a1c``."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


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


class Paths(NamedTuple):
    """A run's input and output, resolved and checked once (:func:`check_run`)."""

    input_fs: Any
    input_root: str
    input_uri: str
    output: Output


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
    from pipeline.sink import utc_iso

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


def check_run(config: EmbedConfig) -> Paths:
    """:func:`check_paths`, then a writable output and a weights file that can be a checkpoint
    (from its first bytes): what fails in a second, before anything is listed or loaded."""
    paths = check_paths(config)
    with storage_errors(paths.output.uri):
        paths.output.check_writable()
    sniff_checkpoint(config.weights, storage_options=config.fs_options())
    return paths


def check_paths(config: EmbedConfig) -> Paths:
    """The input's filesystem, root and URI, and the output; refuses a missing input and an
    output inside the input."""
    options = config.fs_options()
    in_fs, in_root = open_fs(config.input, options)
    input_uri = to_uri(in_fs, in_root)
    output = Output(config.output, options)
    if is_local(in_fs) and is_local(output.fs):
        inside = within(output.root, in_root)  # real paths: through links and ".."
    else:
        inside = type(in_fs) is type(output.fs) and (output.root + "/").startswith(
            in_root.rstrip("/") + "/"
        )
    if inside:
        raise ConfigError(
            f"output {output.uri} is inside input {input_uri}: its Parquet files would be "
            "listed by later runs; choose an output outside the input"
        )
    for name, fs, root in (("--input", in_fs, in_root), ("--output", output.fs, output.root)):
        if is_local(fs) and RAY_WORKING_DIR in os.path.realpath(root) + "/":
            raise ConfigError(
                f"{name} {root} lies in this Ray job's --working-dir, which Ray unpacks to a "
                "new folder for each job: images would be recorded under a path that changes "
                "from job to job. Give an absolute path outside it, or an s3:// URI"
            )
    with storage_errors(input_uri):
        if not in_fs.exists(in_root):
            raise InputError(f"input not found: {input_uri}")
    return Paths(in_fs, in_root, input_uri, output)


def _started_local_ray() -> bool:
    from pipeline import runtime  # imports this module: here, not at the top

    return runtime.started_local_ray


def check_decode_device(config: EmbedConfig, num_gpus: float) -> None:
    """``--decode-device cuda`` needs GPU model actors: refuse it, in one line, elsewhere."""
    if config.decode_device == "cuda" and num_gpus <= 0:
        raise ConfigError(
            "--decode-device cuda needs GPU model actors, and this cluster has no GPU "
            "(or --num-gpus is 0): use --decode-device cpu"
        )


def check_cpu_actors_fit(config: EmbedConfig, num_gpus: float, cpus: float, fixed: bool) -> None:
    """CPU model actors and a decode task must fit the Ray's ``cpus`` together: actors that
    reserve every CPU leave decode none, and the run would wait forever. Refused in one line
    on a Ray of fixed size (``fixed``: the one this process started); on a cluster, whose
    autoscaler may add nodes, a warning."""
    if num_gpus > 0:
        return
    actors = config.concurrency if isinstance(config.concurrency, int) else config.concurrency[0]
    task = max(config.decode_cpus, config.write_cpus)
    need = actors * config.model_cpus + task
    if need <= cpus + 1e-9:
        return
    what = (
        f"--concurrency {actors}: CPU model actors reserve {config.model_cpus:g} CPU each "
        f"(--model-cpus) and decode and writer tasks {task:g} (--decode-cpus, --write-cpus), "
        f"{need:g} CPUs in all, and this Ray has {cpus:g}"
    )
    if fixed:
        if task < cpus:
            fits = f"--model-cpus {(cpus - task) / actors:.3g}"
        else:  # a task alone takes every CPU: halve it
            half = cpus / 2
            fits = f"--model-cpus {half / actors:.3g} --decode-cpus {half:g} --write-cpus {half:g}"
        raise ConfigError(
            f"{what}: nothing would be left to decode on; lower --concurrency, or reserve "
            f"less (e.g. {fits}, and --model-threads cores/actors)"
        )
    logger.warning("%s now: the run waits until the cluster grows", what)


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

    from pipeline.plan import resolve_num_gpus, run_plan
    from pipeline.sink import RunBooks, RunSink

    config, output = prepared.config, prepared.output
    timings = {"start-up": time.time() - prepared.started}  # checks, weights, Ray
    started_listing = time.time()
    snapshot = snapshot or output.snapshot()
    num_gpus = resolve_num_gpus(config)
    check_decode_device(config, num_gpus)
    check_cpu_actors_fit(
        config, num_gpus, ray.cluster_resources().get("CPU", 0.0), fixed=_started_local_ray()
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
            output.committed_images(snapshot, pending=pending) if snapshot is not None else None
        ),
        keep=keep,
        limit=config.limit,
        max_listed=max_listed,
        concurrency=config.list_concurrency,
        tables=(
            list_tables(config.input_list, input_uri, config.fs_options(), in_ray=in_ray)
            if config.input_list
            else None
        ),
    )
    if listing.counts.listed == 0:
        raise InputError(
            f"no images under {input_uri} ({listing.counts.skipped_by_extension} other files "
            f"skipped; images end in .{', .'.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return listing


@dataclasses.dataclass(frozen=True)
class DryRun:
    """What a run would do: counts, an estimate, and what it would refuse."""

    listing: NewImages
    seconds_per_image: float | None  # the last committed run's, while embedding
    refusal: str | None  # the run would stop here, with this line


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
    refusal = _model_difference(config, snapshot, output) if incremental or limited_full else None
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


def _model_difference(config: EmbedConfig, snapshot: Snapshot, output: Output) -> str | None:
    """Why the table's model differs from the one ``config`` names, as far as is known
    without loading the weights (their name stands for their sha256)."""
    manifest = snapshot.manifest
    if manifest is None or manifest.model is None:
        return None
    preprocessing = preprocess_spec(config.resize, jpeg_draft=config.jpeg_draft).to_metadata()
    model = dataclasses.replace(
        manifest.model, weights=weights_name(config), normalized=config.normalize
    )
    if model.weights != manifest.model.weights:
        return (
            f"{output.uri} holds embeddings of weights {manifest.model.weights!r}, this run "
            f"names {model.weights!r}: it refuses them unless their sha256 is the recorded one "
            "(--full replaces the table)"
        )
    try:
        check_same_model(manifest, model, preprocessing, output.uri)
    except PipelineError as exc:
        return str(exc)
    return None


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
    from pipeline.sink import utc_iso

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
        if _model_difference(config, snapshot, output) is not None:
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


def check_same_model(
    previous: Manifest,
    model: ModelIdentity,
    preprocessing: Mapping[str, Any],
    output: str,
    *,
    limited_full: bool = False,
) -> None:
    """Refuse to mix vectors of different models or preprocessing in one table.

    ``limited_full``: the run is ``--full --limit N``, which adds to the table without
    replacing it, so it too must match the table's model.
    """
    fix = (
        "drop --limit, so that --full replaces the whole table"
        if limited_full
        else "pass --full to replace them, or use another output"
    )
    if previous.model is not None:
        difference = previous.model.first_difference(model)
        if difference:
            key, before, now = difference
            raise ConfigError(
                f"{output} holds embeddings with {key}={before!r}, this run would "
                f"write {key}={now!r}: {fix}"
            )
    # Only what turns pixels into inputs is compared, not descriptive keys.
    fields = [f.name for f in dataclasses.fields(PreprocessSpec)]
    before_spec = {k: _plain((previous.preprocessing or {}).get(k)) for k in fields}
    if before_spec != {k: _plain(preprocessing.get(k)) for k in fields}:
        raise ConfigError(
            f"{output} holds embeddings made with other preprocessing "
            f"({before_spec['mode']!r}): {fix}"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value
