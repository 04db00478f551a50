"""The ``embed-images`` command: parse flags into one ``EmbedConfig``, start or join Ray, run.

    embed-images run --input s3://bucket/photos/ --output s3://bucket/embeddings/resnet50/
    embed-images run --input ./photos --output ./out --weights random --limit 100

With no ``--address`` and no ``RAY_ADDRESS`` a local Ray starts; otherwise it joins that cluster.
Exit status 0 only when the run committed; otherwise one line on stderr and a non-zero status:
1 failed (retry may help), 2 bad command line, 3 too many bad images, 130/143 stopped by a signal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.config import (
    COMPILE_MODES,
    CPU_BATCH_SIZE,
    DECODE_DEVICES,
    GPU_BATCH_SIZE,
    PRECISIONS,
    RESIZE_MODES,
    ConfigError,
    EmbedConfig,
    PipelineError,
    parse_concurrency,
)
from pipeline.progress import PROGRESS_MODES, ProgressMode
from pipeline.report import PROG
from pipeline.storage import one_line

if TYPE_CHECKING:
    from pipeline.output import Snapshot

EXIT_FAILED = 1  # the run failed and committed nothing; retrying may help
EXIT_USAGE = 2  # the command line is wrong; retrying will not help
EXIT_BAD_DATA = 3  # too many images failed (--max-error-rate); errors/ says which


class CommandLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        # One line, saying what to fix, instead of argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


RUN_EPILOG = """examples:
  embed-images run --input s3://bucket/photos/ --output s3://bucket/embeddings/resnet50/
  embed-images run --input ./photos --output ./out --weights random --limit 100
  embed-images run --config run.toml --batch-size 256      # flags override the file

--config FILE.toml holds the same options, named as here or as EmbedConfig's fields:
  input = "s3://bucket/photos/"
  batch_size = 256
  storage_options = { anon = true }

exit status:
  0    committed
  1    failed, nothing more of this run committed (a retry may help)
  2    a retry cannot help: bad command line or --config, input not found, output
       inside input, another model in the output, a bad manifest
  3    too many bad images (--max-error-rate: this run's failures and those earlier
       runs were refused for count; failures an earlier run accepted do not)
  130  stopped by Ctrl-C, 143 by SIGTERM (nothing of this run committed; a rerun resumes)
"""


def build_parser() -> argparse.ArgumentParser:
    return build_parsers()[0]


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command's parser, and its ``run`` sub-parser (``--config`` sets its defaults)."""
    parser = CommandLineParser(
        prog=PROG, description="Embed images with ResNet50 into Parquet, on Ray."
    )
    from pipeline import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandLineParser)
    run = commands.add_parser(
        "run",
        help="embed every image under --input into --output",
        description="Embed every image under --input into Parquet tables under --output.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(run)
    status = commands.add_parser(
        "status",
        help="print the committed runs of an output as a table",
        description="Print the runs recorded in OUTPUT/_manifest.json.",
    )
    status.add_argument("output", metavar="OUTPUT", help="the --output of the runs")
    status.add_argument(
        "--json",
        action="store_true",
        help="print the runs as JSON (counts, failures by type, timings; no file lists)",
    )
    query = commands.add_parser(
        "query",
        help="embed one image as OUTPUT was made and print its nearest neighbours",
        description="Embed --image with OUTPUT's recorded model and preprocessing; print the "
        "nearest rows of OUTPUT (L2 distance).",
    )
    query.add_argument("output", metavar="OUTPUT", help="an embed-images --output to search")
    query.add_argument(
        "--image", required=True, metavar="PATH_OR_URI", help="the image to find neighbours of"
    )
    query.add_argument("--k", type=int, default=10, help="neighbours to print (default 10)")
    query.add_argument(
        "--weights",
        metavar="imagenet|random|PATH_OR_URL",
        help="where to load the weights from (default: as recorded in OUTPUT); weights whose "
        "sha256 differs from the recorded one are refused",
    )
    query.add_argument("--seed", type=int, help="seed of --weights random (default: recorded)")
    export = commands.add_parser(
        "export",
        help="stream OUTPUT's embeddings into a FAISS index or a LanceDB table",
        description="Build a FAISS index (plus DEST.ids.parquet) or a LanceDB table from the "
        "current embeddings, batch by batch.",
    )
    export.add_argument("output", metavar="OUTPUT", help="an embed-images --output to export")
    export.add_argument("--to", required=True, choices=("faiss", "lancedb"), help="index kind")
    export.add_argument(
        "dest",
        metavar="DEST",
        help="the index file (faiss; ids go to DEST.ids.parquet) or database folder (lancedb); "
        "its folder must exist",
    )
    export.add_argument("--normalize", action="store_true", help="L2-normalize: cosine similarity")
    export.add_argument("--float16", action="store_true", help="store float16 vectors")
    export.add_argument("--table", default="embeddings", help="LanceDB table name")
    export.add_argument(
        "--batch-size", type=int, default=4096, metavar="N", help="rows per streamed batch"
    )
    compact = commands.add_parser(
        "compact",
        help="rewrite OUTPUT's current table into fresh files, dropping superseded rows",
        description="Rewrite the current embeddings and errors of OUTPUT into fresh files "
        "(on Ray: a local one, or --address / RAY_ADDRESS), drop rows of changed or deleted "
        "images, and commit it atomically; a plain pyarrow.dataset read then equals the "
        "current table.",
    )
    compact.add_argument("output", metavar="OUTPUT", help="an embed-images --output")
    compact.add_argument(
        "--rows-per-file",
        type=int,
        default=10_000,
        metavar="N",
        help="rows per compacted file (default %(default)s)",
    )
    compact.add_argument("--address", metavar="ADDR", help="Ray cluster to run on")
    for sub in (status, query, export, compact):
        sub.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint")
        sub.add_argument(
            "--storage-options",
            type=_json_object,
            default={},
            metavar="JSON",
            help="fsspec options",
        )
    return parser, run


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags of a run (shared by ``embed-images run`` and the ``jobs/`` entry points).

    Each flag is named after its ``EmbedConfig`` field and takes that field's default.
    """
    io = run.add_argument_group("input and output")
    model = run.add_argument_group("model")
    speed = run.add_argument_group("performance")
    cluster = run.add_argument_group("cluster, storage and logs")
    io.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read options from a TOML file; flags on the command line override it",
    )
    io.add_argument(
        "--input",
        metavar="URI",
        help="folder or prefix of images: local path, file://, s3://, any fsspec URL (required)",
    )
    io.add_argument(
        "--output",
        metavar="URI",
        help="where embeddings/, errors/ and _manifest.json go (required)",
    )
    io.add_argument("--limit", type=int, metavar="N", help="embed at most N listed images")
    io.add_argument(
        "--dry-run",
        action="store_true",
        help="list the input, diff it against the output, print what a run would do; "
        "starts no Ray, loads no weights, writes nothing",
    )
    io.add_argument(
        "--full",
        action="store_true",
        help="re-embed everything, replacing the output's tables (default: only "
        "images new or changed since the committed runs)",
    )
    io.add_argument(
        "--max-error-rate",
        type=float,
        metavar="F",
        help="fail (committing only errors/) when more than this fraction of "
        "images fail (default %(default)s)",
    )
    io.add_argument(
        "--cleanup-retention",
        type=float,
        metavar="SECONDS",
        help="the clean-up at a run's start deletes files no manifest lists only once they "
        "are this old (default %(default)s); live runs' files are never touched",
    )
    io.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="refuse images whose header claims more pixels (default: Pillow's, %(default)s)",
    )
    io.add_argument(
        "--rows-per-file",
        type=int,
        metavar="N",
        help="rows per Parquet file: model batches are bundled up to at least N rows a file "
        "(default %(default)s)",
    )
    io.add_argument(
        "--input-list",
        metavar="URI",
        help="take the images from a list instead of listing --input: an S3 Inventory "
        "manifest.json, or a Parquet/CSV file with a 'uri' column (optional 'size', "
        "'version'), or a text file of one URI per line; entries outside --input are ignored",
    )
    io.add_argument(
        "--commit-every",
        type=int,
        metavar="N",
        help="commit a checkpoint every N images written: a run stopped mid-way keeps its "
        "checkpoints, and the next run embeds only the rest (default %(default)s)",
    )
    io.add_argument(
        "--commit-interval",
        type=float,
        metavar="SECONDS",
        help="commit what is written at least this often (default %(default)s)",
    )
    io.add_argument(
        "--list-concurrency",
        type=int,
        metavar="N",
        help="LIST requests in flight at once on an object store: the input prefix is split "
        "by its subfolders and listed in parallel (default %(default)s)",
    )
    model.add_argument(
        "--weights",
        metavar="imagenet|random|PATH_OR_URL",
        help="ResNet50 weights (default: imagenet = torchvision IMAGENET1K_V2)",
    )
    model.add_argument(
        "--weights-sha256",
        type=str.lower,
        metavar="HEX",
        help="expected sha256 of the weights file, checked before loading",
    )
    model.add_argument("--seed", type=int, help="seed of --weights random (default %(default)s)")
    model.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        help="center-crop: the weights' own transform (default); squash; letterbox",
    )
    model.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="let libjpeg downscale before the exact resize (faster, pixels differ)",
    )
    model.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="autocast dtype (default %(default)s): fp16 or bf16 on GPU; bf16 on CPUs with "
        "AVX512-BF16 or AMX, refused on others; CPU actors compute fp16 as fp32 and record it",
    )
    model.add_argument("--normalize", action="store_true", help="L2-normalize each embedding")
    speed.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"images per model forward (default {GPU_BATCH_SIZE} on GPU actors, "
        f"{CPU_BATCH_SIZE} on CPU)",
    )
    speed.add_argument(
        "--decode-device",
        choices=DECODE_DEVICES,
        help="cpu: decode tasks send pixels to the model; cuda: they send the files' bytes and "
        "GPU model actors decode JPEGs with nvJPEG (default %(default)s)",
    )
    speed.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="torch.compile the model; auto: on GPU actors only (default %(default)s)",
    )
    speed.add_argument(
        "--concurrency",
        type=_concurrency,
        metavar="N|MIN,MAX",
        help="model actors: fixed N or autoscaling MIN,MAX (default %(default)s)",
    )
    speed.add_argument(
        "--calls-per-actor",
        type=int,
        metavar="N",
        help="batches each model actor works on at once, a thread and CUDA stream each, so "
        "copies and GPU decode overlap forward passes; 1 on CPU actors (default %(default)s)",
    )
    speed.add_argument(
        "--num-gpus",
        type=float,
        metavar="F",
        help="GPUs per model actor, fractions allowed (default 1 if the cluster has GPUs, else 0)",
    )
    speed.add_argument(
        "--model-threads",
        type=int,
        metavar="N",
        help="torch threads per CPU model actor (default: all cores; cores/actors if several "
        "share a node)",
    )
    speed.add_argument(
        "--model-cpus",
        type=float,
        metavar="F",
        help="CPUs reserved per CPU model actor, fractions allowed; the rest decode and write "
        "(default %(default)s)",
    )
    speed.add_argument(
        "--decode-batch-size",
        type=int,
        metavar="N",
        help="images per decode task batch (default %(default)s)",
    )
    speed.add_argument(
        "--decode-cpus",
        type=float,
        metavar="F",
        help="CPUs reserved per decode task, fractions allowed (default %(default)s)",
    )
    speed.add_argument(
        "--decode-memory",
        type=_byte_size,
        metavar="BYTES",
        help="RAM reserved per decode task, e.g. 1GiB (default %(default)s bytes)",
    )
    speed.add_argument(
        "--write-cpus",
        type=float,
        metavar="F",
        help="CPUs reserved per writer task, fractions allowed (default %(default)s)",
    )
    cluster.add_argument(
        "--address",
        metavar="ADDRESS",
        help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)",
    )
    cluster.add_argument(
        "--object-store-memory",
        type=_byte_size,
        metavar="BYTES",
        help="object store size when this command starts a local Ray, e.g. 2GiB (default: "
        "Ray's, 30%% of RAM; a cluster sets its own)",
    )
    cluster.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="S3 endpoint (default: AWS_ENDPOINT_URL or the AWS chain)",
    )
    cluster.add_argument(
        "--storage-options",
        type=_json_object,
        metavar="JSON",
        help="fsspec options for input and output, e.g. '{\"anon\": true}'",
    )
    run.set_defaults(**config_defaults())
    cluster.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING"),
        default="INFO",
        help="level of this pipeline's own logs (default INFO; libraries log warnings only; "
        "DEBUG also shows Ray's own INFO lines and progress bars)",
    )
    cluster.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="images done while it runs, on stderr: a bar on a terminal, a line every 30 s or "
        "5%% when piped (default auto: by the terminal)",
    )
    cluster.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="DEBUG",
        help="the same as --log-level DEBUG",
    )


def parse_run_args(
    parser: argparse.ArgumentParser, run: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file's options become ``run``'s defaults first, so that
    flags on the command line override them. ``--input`` and ``--output`` are required from
    one or the other."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    found, _ = finder.parse_known_args(argv)
    if found.config:
        run.set_defaults(**_read_config_file(found.config, run))
    args = parser.parse_args(argv)
    if getattr(args, "input", "") is None or getattr(args, "output", "") is None:
        missing = " and ".join(f"--{n}" for n in ("input", "output") if getattr(args, n) is None)
        run.error(f"the following arguments are required: {missing}")
    return args


def _read_config_file(path: str, run: argparse.ArgumentParser) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as exc:
        run.error(f"--config {path}: {exc.strerror or exc}")
    except tomllib.TOMLDecodeError as exc:
        run.error(f"--config {path}: not valid TOML ({exc})")
    known = {action.dest: action for action in run._actions}
    settings: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known or name in ("config", "help"):
            run.error(f"--config {path}: unknown option {key!r}")
        convert = known[name].type
        if isinstance(value, str) and callable(convert):
            try:
                value = convert(value)  # the flag's own parsing: "2GiB", "1,4", …
            except (argparse.ArgumentTypeError, ValueError) as exc:
                run.error(f"--config {path}: {key} {value!r}: {exc}")
        settings[name] = value
    return settings


def _byte_size(text: str) -> int:
    """``2147483648``, ``2GiB``, ``512MiB``, ``2GB``: a size in bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes or e.g. 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale |= {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(number * scale[unit])


def _concurrency(text: str) -> int | tuple[int, int]:
    try:
        return parse_concurrency(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--concurrency ")) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    """The run's ``EmbedConfig``, from the flags named after its fields (the rest is ignored)."""
    given = vars(args)
    return EmbedConfig(
        **{f.name: given[f.name] for f in dataclasses.fields(EmbedConfig) if f.name in given}
    )


def config_defaults() -> dict[str, Any]:
    """``EmbedConfig``'s defaults, which the flags take (and ``--help`` prints)."""
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(EmbedConfig):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.storage_options)
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    return options


def run_command(args: argparse.Namespace) -> int:
    if args.dry_run:
        from pipeline.report import print_dry_run
        from pipeline.run import dry_run

        print_dry_run(dry_run(config_from_args(args)))
        return 0
    return run_and_report(
        config_from_args(args),
        args.address,
        verbose=args.log_level == "DEBUG",
        progress=args.progress,
    )


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
    from pipeline.run import (
        check_run,
        commit_without_work,
        execute_run,
        new_run_id,
        probe_run,
    )
    from pipeline.runtime import Stopped, catch_stop_signals, prepare_and_start_ray, stopped_run

    paths = check_run(config)  # once: the probe and the run share it
    run_id = run_id or new_run_id()
    # Held from here to the end: a second run into this output is refused before it
    # lists anything, and whatever way this one ends, its staging goes.
    with paths.output.lease(run_id):
        probe = probe_run(config, paths, snapshot=snapshot)
        if probe is not None and probe.listing.to_embed == 0:
            record = commit_without_work(config, probe, run_id=run_id)
            output = probe.output
        else:
            if progress == "auto":  # decided here: stderr is a pipe to the filter below
                progress = "bar" if sys.stderr.isatty() else "log"
            with native_stderr_filtered(enabled=not verbose):
                prepared = prepare_and_start_ray(
                    config, address, paths=paths, run_id=run_id, verbose=verbose
                )
                catch_stop_signals()  # again: ray.init installs a SIGTERM handler of its own
                try:
                    record = execute_run(
                        prepared,
                        snapshot=probe.snapshot if probe else snapshot,
                        listing=probe.listing if probe else None,
                        progress=progress,
                    )
                except Stopped as stop:
                    return stopped_run(stop, prepared)
            output = prepared.output
    print_summary(record, output.uri, report=output.report_uri(record.run_id))
    return 0


def status_command(args: argparse.Namespace) -> int:
    from pipeline.output import read_manifest
    from pipeline.report import print_runs

    manifest = read_manifest(args.output, storage_options=_options(args))
    if manifest is None:
        raise PipelineError(f"no committed run under {args.output}")
    if args.json:
        runs = [run.to_json() for run in manifest.runs]
        for run in runs:
            run.pop("files")  # the manifest's business; large at scale
        print(json.dumps({"output": args.output, "runs": runs}, indent=2))
    else:
        print_runs(manifest)
    return 0


def query_command(args: argparse.Namespace) -> int:
    from pipeline.query import nearest
    from pipeline.report import print_neighbours

    table = nearest(
        args.output,
        args.image,
        k=args.k,
        weights=args.weights,
        seed=args.seed,
        storage_options=_options(args),
    )
    print_neighbours(table)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from pipeline.export import export_faiss, export_lancedb

    options = _options(args)
    if args.to == "faiss":
        count = export_faiss(
            args.output,
            args.dest,
            normalize=args.normalize,
            float16=args.float16,
            batch_size=args.batch_size,
            storage_options=options,
        )
        print(
            f"{PROG}: wrote a FAISS index of {count} vectors to {args.dest} "
            f"(ids: {args.dest}.ids.parquet)"
        )
    else:
        count = export_lancedb(
            args.output,
            args.dest,
            table=args.table,
            normalize=args.normalize,
            float16=args.float16,
            batch_size=args.batch_size,
            storage_options=options,
        )
        print(f"{PROG}: wrote {count} rows to LanceDB table {args.table!r} at {args.dest}")
    return 0


def report_failure(exc: PipelineError, *, prog: str = PROG) -> int:
    """Print the one line a failed command owes its user; return the exit status."""
    from pipeline.config import NotRetryableError
    from pipeline.sink import ErrorRateExceededError

    print(f"{prog}: error: {exc}", file=sys.stderr)
    if isinstance(exc, ErrorRateExceededError):
        return EXIT_BAD_DATA
    return EXIT_USAGE if isinstance(exc, NotRetryableError) else EXIT_FAILED


def compact_command(args: argparse.Namespace) -> int:
    from pipeline.compact import compact
    from pipeline.runtime import start_ray

    if args.rows_per_file < 1:
        raise ConfigError(f"--rows-per-file {args.rows_per_file}: must be an integer >= 1")
    start_ray(args.address)
    record = compact(args.output, storage_options=_options(args), rows_per_file=args.rows_per_file)
    print(
        f"{PROG}: compacted {args.output}: {record.counts.embedded} embeddings and "
        f"{record.counts.failed} errors rewritten as run {record.run_id}"
    )
    return 0


COMMANDS = {
    "run": run_command,
    "status": status_command,
    "compact": compact_command,
    "query": query_command,
    "export": export_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embed-images`` console script; returns the exit status."""
    parser, run = build_parsers()
    args = parse_run_args(parser, run, list(sys.argv[1:] if argv is None else argv))
    configure_command_logging(args)
    return run_guarded(lambda: COMMANDS[args.command](args), committed=args.command == "run")


def configure_command_logging(args: argparse.Namespace) -> None:
    """Logging for a command line: its level, and every credential it names redacted."""
    from pipeline.logs import configure_logging

    configure_logging(
        getattr(args, "log_level", "INFO"),
        storage_options=getattr(args, "storage_options", {}),
        urls=[getattr(args, name, None) for name in ("weights", "input", "output", "input_list")]
        + [getattr(args, "endpoint_url", None)],
    )


def run_guarded(command: Callable[[], int], *, committed: bool = True, prog: str = PROG) -> int:
    """Run a command the way every entry point does (``embed-images``, ``jobs/*``): stop
    signals caught, and any failure one line on stderr with its exit status
    (:func:`report_failure`), never a traceback."""
    from pipeline.runtime import Stopped, catch_stop_signals

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


def console() -> NoReturn:
    """The ``embed-images`` console script: :func:`main`, then the exit.

    A process that started its own local Ray kills that Ray's processes and exits as soon
    as its output is flushed: Ray's orderly shutdown plus the interpreter's teardown (3.3 s
    after the summary of a small run here) would buy a command line nothing. A driver that
    joined a cluster leaves it the usual way.
    """
    import logging
    import os

    from pipeline import runtime

    status = main()
    if runtime.started_local_ray:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        runtime.kill_local_ray()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    console()
