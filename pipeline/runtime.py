"""The entry points' side of a run: start or join Ray (the stages and the plan never do), stop
cleanly on Ctrl-C or SIGTERM, and the calls every entry point shares: :func:`run_and_report`
(``embed-images run``, ``jobs/``), :func:`run_guarded` (one error line and exit status for any
failure) and :func:`embed_images`, the one call that runs the pipeline from Python."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.checks import Run, check_run
from pipeline.config import (
    EXIT_BAD_DATA,
    EXIT_FAILED,
    EXIT_QUALITY_GATE,
    EXIT_USAGE,
    PROG,
    ConfigError,
    EmbedConfig,
    NotRetryableError,
    PipelineError,
)
from pipeline.manifest import RunRecord
from pipeline.progress import ProgressMode
from pipeline.run import commit_without_work, execute_run, prepare_run, probe_run, read_output
from pipeline.stop import Drain, Stopped, catch_stop_signals, end_drain
from pipeline.storage import one_line

if TYPE_CHECKING:
    from pipeline.output import Snapshot

logger = logging.getLogger(__name__)


def prepare_and_start_ray(run: Run, address: str | None, *, verbose: bool = False) -> Run:
    """``prepare_run`` and ``start_ray``, overlapped where that is safe and worth it.

    Bad input or output, and a weights file that is missing or not a checkpoint at all, have
    failed already (:func:`~pipeline.checks.check_run`), in a second, before Ray starts.
    Starting a local Ray takes seconds, so the weights (torch import, checks) load meanwhile,
    once Ray is imported, and a checkpoint that is not a ResNet50 fails once both are done.
    Joining a running cluster takes a fraction of a second and, in a submitted job, may swap
    the working directory under a thread importing torch: there the weights load first, then
    the driver joins.
    """

    def start() -> None:
        start_ray(address, object_store_memory=run.config.object_store_memory, verbose=verbose)

    if joins_running_ray(address):
        run = prepare_run(run)
        start()
        return run
    # Ray's and Ray Data's imports come first: beside the weights' torch import they would
    # share the GIL, and they lie on the way to ray.init, the longer of the two paths.
    quiet_ray(verbose)
    return prepare_run(run, meanwhile=start)


def joins_running_ray(address: str | None) -> bool:
    """Whether ``ray.init`` will join a cluster (``--address`` or ``RAY_ADDRESS``)."""
    return address is not None or bool(os.environ.get("RAY_ADDRESS"))


def start_ray(
    address: str | None, *, object_store_memory: int | None = None, verbose: bool = False
) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray; reuse one already up.

    Args:
        address: Ray cluster to join (``None``: ``RAY_ADDRESS``, else a local Ray).
        object_store_memory: Object store of a local Ray this starts.
        verbose: Keep Ray's and Ray Data's INFO lines and progress bars on the console;
            otherwise they go to Ray's log folder only, which is named once.
    """
    import ray

    quiet_ray(verbose)
    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.WARNING
    if not joins_running_ray(address):
        # A local Ray needs no dashboard.
        ray.init(
            include_dashboard=False,
            log_to_driver=True,
            object_store_memory=object_store_memory,
            logging_level=level,
        )
    else:
        if object_store_memory is not None:
            logger.warning(
                "--object-store-memory ignored: joining a running Ray, whose store was sized "
                "at `ray start`"
            )
        ray.init(address=address, log_to_driver=True, logging_level=level)
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        logger.info("Ray's own logs: %s", node.get_logs_dir_path())


def kill_local_ray() -> None:
    """SIGKILL every process of the local Ray this process started, at once: the GCS, the
    raylet, its agents and its workers.

    For a command that exits without Ray's orderly shutdown (:func:`pipeline.cli.console`).
    Ray's fate sharing takes the raylet and its workers with the driver, but the raylet's
    dashboard and runtime-env agents outlive it, holding their ports: a local Ray started
    meanwhile waits for its agent's port, then goes without it.
    """
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return
    # Ray's own copy (ray/thirdparty_files), on sys.path once ray is imported.
    import psutil

    found: list[psutil.Process] = []
    for infos in node.all_processes.values():
        for info in infos:
            if info.process is None:
                continue
            try:
                root = psutil.Process(info.process.pid)
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
    for process in found:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def quiet_ray(verbose: bool) -> None:
    """Ray's INFO lines and Ray Data's progress stay off the console unless ``verbose``.

    Ray Data logs to its console handler and to ``ray-data.log`` in Ray's session folder:
    only the console handler is raised to WARNING. Token authentication is on by default
    (README, "Security defaults"), so its notice at every start is logged at INFO only.
    """
    import ray.data
    from ray.util.debug import log_once

    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.INFO if verbose else logging.ERROR
    )
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(level)
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        # Ray Data warns once per process that its bars are off; they are off by our choice.
        log_once("ray_data_progress_manager_disabled")


def embed_images(
    *, input: str, output: str, address: str | None = None, verbose: bool = False, **options: Any
) -> RunRecord:
    """Embed every image under ``input`` into ``output``: ``embed-images run`` as one call.

    It starts a local Ray, or joins ``address`` (or ``RAY_ADDRESS``), or uses the Ray this
    process already runs, exactly as the command does.

    Args:
        input: Folder or prefix of images (local path, ``file://``, ``s3://``, any fsspec URL).
        output: Where the tables and ``_manifest.json`` go.
        address: Ray cluster to join.
        verbose: Ray's own INFO lines and progress bars on the console.
        **options: Any other ``EmbedConfig`` field, e.g. ``weights="random"``,
            ``batch_size=256``, ``storage_options={"anon": True}``.

    Returns:
        The committed run's record: ``run.counts.embedded``, ``run.failures``, ….

    Raises:
        PipelineError: what the command would print as its one line (``ConfigError`` for a
            bad or unknown option, ``ErrorRateExceededError`` for too many bad images,
            ``QualityGateError`` for a vector with a NaN or an infinity).

    Example:
        >>> from pipeline import embed_images
        >>> run = embed_images(input="photos", output="out", weights="random")  # doctest: +SKIP
        >>> run.counts.embedded  # doctest: +SKIP
        24
    """
    fields = {f.name for f in dataclasses.fields(EmbedConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r}: options are EmbedConfig's fields "
            f"({', '.join(sorted(fields - {'input', 'output'}))})"
        )
    run = check_run(EmbedConfig(input=input, output=output, **options))
    with run.output.lease(run.run_id):
        return execute_run(prepare_and_start_ray(run, address, verbose=verbose))


def stopped_run(stop: Stopped, run: Run) -> int:
    """Leave Ray and the output clean after a stop signal, say so in one line on stderr, and
    return the exit status."""
    import ray

    # A local Ray goes with its driver; a cluster cancels the tasks of a driver that leaves.
    ray.shutdown()
    output, run_id = run.output, run.run_id
    manifest = output.snapshot().manifest
    record = manifest.record(run_id) if manifest is not None else None
    # Committed files have left staging (on S3 they are copies): what is there is scratch.
    output.discard_staging(run_id)
    if record is None:
        what = f"nothing of run {run_id} was committed (earlier runs are intact)"
    elif record.committed:
        what = f"run {run_id} had already committed"
    else:
        kept = record.counts.embedded + record.counts.failed
        commits = record.checkpoints + 1
        what = f"run {run_id} kept {kept} images in {commits} checkpoint{'s' * (commits > 1)}"
    seconds = time.time() - run.started
    drained = f" and a drain of {run.config.drain_seconds:g} s" if stop.drained else ""
    if stop.reason is None:
        line = f"stopped by {stop} after {seconds:.0f} s{drained}: {what}"
    else:  # a stall (pipeline.nodes)
        line = f"stopped after {seconds:.0f} s{drained}: {stop.reason}; {what}"
    print(f"{PROG}: {line}; run the same command again to embed what is left", file=sys.stderr)
    return stop.exit_status


def run_and_report(
    config: EmbedConfig,
    address: str | None,
    *,
    run_id: str | None = None,
    snapshot: Snapshot | None = None,
    verbose: bool = False,
    progress: ProgressMode = "auto",
) -> int:
    """Probe the input; if there is work, start or join Ray and run; print the summary;
    return the exit status.

    Shared by ``embed-images run`` and ``jobs/``. ``PipelineError`` propagates (the caller
    prints it); a stop signal during the run leaves Ray and the output clean. An input of at
    most ``PROBE_LISTED`` images is listed before anything starts, so that a run with nothing
    to embed commits (its deletions) in seconds, with no Ray and no weights.
    """
    from pipeline.logs import native_stderr_filtered
    from pipeline.report import print_summary

    run = check_run(config, run_id)  # once: the probe and the run share it
    # Held from here to the end: a second run into this output is refused before it
    # lists anything, and whatever way this one ends, its staging goes.
    with run.output.lease(run.run_id):
        run = read_output(run, snapshot)
        probe = probe_run(run)
        if probe is not None and probe.to_embed == 0:
            record = commit_without_work(run, probe)
        else:
            if progress == "auto":  # decided here: stderr is a pipe to the filter below
                progress = "bar" if sys.stderr.isatty() else "log"
            with native_stderr_filtered(enabled=not verbose):
                run = prepare_and_start_ray(run, address, verbose=verbose)
                # Again: ray.init installs a SIGTERM handler of its own. SIGTERM now drains.
                drain = Drain(config.drain_seconds, config.lost_node_wait)
                catch_stop_signals(drain)
                try:
                    try:
                        record = execute_run(run, listing=probe, progress=progress, drain=drain)
                    finally:
                        end_drain(drain)  # before the stop's clean-up, which it would cut
                except Stopped as stop:
                    return stopped_run(stop, run)
    print_summary(record, run.output.uri, report=run.output.report_uri(record.run_id))
    return 0


def report_failure(exc: PipelineError, *, prog: str = PROG) -> int:
    """Print the one line a failed command owes its user; return the exit status."""
    from pipeline.sink import ErrorRateExceededError, QualityGateError

    print(f"{prog}: error: {exc}", file=sys.stderr)
    if isinstance(exc, ErrorRateExceededError):
        return EXIT_BAD_DATA
    if isinstance(exc, QualityGateError):
        return EXIT_QUALITY_GATE
    return EXIT_USAGE if isinstance(exc, NotRetryableError) else EXIT_FAILED


def run_guarded(command: Callable[[], int], *, committed: bool = True, prog: str = PROG) -> int:
    """Run a command the way every entry point does (``embed-images``, ``jobs/*``): stop
    signals caught, and any failure one line on stderr with its exit status
    (:func:`report_failure`), never a traceback."""
    catch_stop_signals()
    try:
        return command()
    except Stopped as stop:
        what = "; nothing was committed" if committed else ""
        print(f"{prog}: stopped by {stop}{what}", file=sys.stderr)
        return stop.exit_status
    except PipelineError as exc:
        return report_failure(exc, prog=prog)
    except OSError as exc:
        # An I/O failure after the checks (a store that went away mid-run, a permission
        # error): nothing more was committed, since the manifest is written last.
        return report_failure(
            PipelineError(f"I/O failure, nothing committed: {one_line(exc)}"), prog=prog
        )
