"""The ``embed-images`` command: parse flags into one ``EmbedConfig``, start or join Ray, run.

    embed-images run --input s3://bucket/photos/ --output s3://bucket/embeddings/resnet50/
    embed-images run --input ./photos --output ./out --weights random --limit 100

With no ``--address`` and no ``RAY_ADDRESS`` a local Ray starts; otherwise it joins that cluster.
Exit status 0 only when the run committed; otherwise one line on stderr and a non-zero status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.config import (
    PRECISIONS,
    RESIZE_MODES,
    ConfigError,
    EmbedConfig,
    PipelineError,
    parse_concurrency,
)

if TYPE_CHECKING:
    from pipeline.plan import PreparedRun

PROG = "embed-images"
EXIT_FAILED = 1  # the run failed and committed nothing; retrying may help
EXIT_USAGE = 2  # the command line is wrong; retrying will not help
EXIT_BAD_DATA = 3  # too many images failed (--max-error-rate); errors/ says which


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, saying what to fix, instead of argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Embed images with ResNet50 into Parquet, on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="embed every image under --input into --output",
        description="Embed every image under --input into Parquet tables under --output.",
    )
    add_run_arguments(run)
    status = commands.add_parser(
        "status",
        help="print the committed runs of an output as a table",
        description="Print the runs recorded in OUTPUT/_manifest.json.",
    )
    status.add_argument("output", metavar="OUTPUT", help="the --output of the runs")
    query = commands.add_parser(
        "query",
        help="embed one image as OUTPUT was made and print its nearest neighbours",
        description="Embed --image with OUTPUT's recorded model and preprocessing; print the "
        "nearest rows of OUTPUT (L2 distance).",
    )
    query.add_argument("output", metavar="OUTPUT")
    query.add_argument("--image", required=True, metavar="PATH_OR_URI")
    query.add_argument("--k", type=int, default=10, help="neighbours to print (default 10)")
    query.add_argument(
        "--weights",
        metavar="imagenet|random|PATH_OR_URL",
        help="default: the weights recorded in OUTPUT; others are refused (sha256)",
    )
    query.add_argument("--seed", type=int, help="seed of --weights random")
    export = commands.add_parser(
        "export",
        help="stream OUTPUT's embeddings into a FAISS index or a LanceDB table",
        description="Build a FAISS index (plus DEST.ids.parquet) or a LanceDB table from the "
        "current embeddings, batch by batch.",
    )
    export.add_argument("output", metavar="OUTPUT")
    export.add_argument("--to", required=True, choices=("faiss", "lancedb"))
    export.add_argument("dest", metavar="DEST", help="index file (faiss) or database (lancedb)")
    export.add_argument("--normalize", action="store_true", help="L2-normalize: cosine similarity")
    export.add_argument("--float16", action="store_true", help="store float16 vectors")
    export.add_argument("--table", default="embeddings", help="LanceDB table name")
    export.add_argument("--batch-size", type=int, default=4096, metavar="N")
    for sub in (status, query, export):
        sub.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint")
        sub.add_argument(
            "--storage-options",
            type=_json_object,
            default={},
            metavar="JSON",
            help="fsspec options",
        )
    return parser


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags of a run (shared by ``embed-images run`` and ``python -m jobs.embed_images``)."""
    run.add_argument(
        "--input",
        required=True,
        metavar="URI",
        help="folder or prefix of images: local path, file://, s3://, any fsspec URL",
    )
    run.add_argument(
        "--output",
        required=True,
        metavar="URI",
        help="where embeddings/, errors/ and _manifest.json go",
    )
    run.add_argument(
        "--weights",
        default="imagenet",
        metavar="imagenet|random|PATH_OR_URL",
        help="ResNet50 weights (default: imagenet = torchvision IMAGENET1K_V2)",
    )
    run.add_argument(
        "--weights-sha256",
        metavar="HEX",
        help="expected sha256 of the weights file, checked before loading",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of --weights random (default 0)")
    run.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="center-crop",
        help="center-crop: the weights' own transform (default); squash; letterbox",
    )
    run.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="let libjpeg downscale before the exact resize (faster, pixels differ)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="images per model forward (default 32)",
    )
    run.add_argument(
        "--decode-batch-size",
        type=int,
        default=16,
        metavar="N",
        help="images per decode task batch (default 16)",
    )
    run.add_argument(
        "--decode-cpus",
        type=float,
        default=1.0,
        metavar="F",
        help="CPUs reserved per decode and write task, fractions allowed (default 1)",
    )
    run.add_argument(
        "--object-store-memory",
        type=_byte_size,
        metavar="BYTES",
        help="object store size when this command starts a local Ray, e.g. 2GiB (default: "
        "Ray's, 30%% of RAM; a cluster sets its own)",
    )
    run.add_argument(
        "--rows-per-file",
        type=int,
        default=4096,
        metavar="N",
        help="rows per Parquet file (default 4096)",
    )
    run.add_argument(
        "--concurrency",
        type=_concurrency,
        default=1,
        metavar="N|MIN,MAX",
        help="model actors: fixed N or autoscaling MIN,MAX (default 1)",
    )
    run.add_argument(
        "--num-gpus",
        type=float,
        metavar="F",
        help="GPUs per model actor, fractions allowed (default 1 if the cluster has GPUs, else 0)",
    )
    run.add_argument(
        "--model-threads",
        type=int,
        metavar="N",
        help="torch threads per CPU model actor (default: all cores; cores/actors if several "
        "share a node)",
    )
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="autocast dtype on GPU (default fp32; CPU always computes fp32)",
    )
    run.add_argument("--normalize", action="store_true", help="L2-normalize each embedding")
    run.add_argument("--limit", type=int, metavar="N", help="embed at most N listed images")
    run.add_argument(
        "--full",
        action="store_true",
        help="re-embed everything, replacing the output's tables (default: only "
        "images new or changed since the committed runs)",
    )
    run.add_argument(
        "--max-error-rate",
        type=float,
        default=0.1,
        metavar="F",
        help="fail (committing only errors/) when more than this fraction of "
        "images fail (default 0.1)",
    )
    run.add_argument(
        "--max-image-pixels",
        type=int,
        default=89_478_485,
        metavar="N",
        help="refuse images whose header claims more pixels (default: Pillow's)",
    )
    run.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="S3 endpoint (default: AWS_ENDPOINT_URL or the AWS chain)",
    )
    run.add_argument(
        "--storage-options",
        type=_json_object,
        default={},
        metavar="JSON",
        help="fsspec options for input and output, e.g. '{\"anon\": true}'",
    )
    run.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING"),
        default="INFO",
        help="level of this pipeline's own logs (default INFO; libraries log warnings only)",
    )
    run.add_argument(
        "--address",
        metavar="ADDRESS",
        help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)",
    )


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
    return EmbedConfig(
        input=args.input,
        output=args.output,
        weights=args.weights,
        weights_sha256=args.weights_sha256.lower() if args.weights_sha256 else None,
        seed=args.seed,
        resize=args.resize,
        jpeg_draft=args.jpeg_draft,
        batch_size=args.batch_size,
        decode_batch_size=args.decode_batch_size,
        rows_per_file=args.rows_per_file,
        concurrency=args.concurrency,
        num_gpus=args.num_gpus,
        model_threads=args.model_threads,
        decode_cpus=args.decode_cpus,
        object_store_memory=args.object_store_memory,
        precision=args.precision,
        normalize=args.normalize,
        limit=args.limit,
        full=args.full,
        max_error_rate=args.max_error_rate,
        max_image_pixels=args.max_image_pixels,
        storage_options=args.storage_options,
        endpoint_url=args.endpoint_url,
    )


def prepare_and_start_ray(
    config: EmbedConfig, address: str | None, *, run_id: str | None = None
) -> PreparedRun:
    """``prepare_run`` and ``start_ray``, overlapped where that is safe and worth it.

    Bad input or output, and a weights file that is missing or not a checkpoint at all, fail
    first, in a second, before Ray starts. Starting a local Ray takes seconds, so the weights
    (torch import, checks) load meanwhile, and a checkpoint that is not a ResNet50 fails once
    both are done. Joining a running cluster takes a fraction of a second and, in a submitted
    job, may swap the working directory under a thread importing torch: there the weights load
    first, then the driver joins.
    """
    from pipeline.plan import prepare_run

    def start() -> None:
        start_ray(address, object_store_memory=config.object_store_memory)

    if _joins_running_ray(address):
        prepared = prepare_run(config, run_id=run_id)
        start()
        return prepared
    return prepare_run(config, run_id=run_id, meanwhile=start)


def _joins_running_ray(address: str | None) -> bool:
    """Whether ``ray.init`` will join a cluster (``--address`` or ``RAY_ADDRESS``)."""
    return address is not None or bool(os.environ.get("RAY_ADDRESS"))


def start_ray(address: str | None, *, object_store_memory: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray; reuse one already up."""
    import ray

    if ray.is_initialized():
        return
    if not _joins_running_ray(address):
        # A local Ray needs no dashboard.
        ray.init(
            include_dashboard=False, log_to_driver=True, object_store_memory=object_store_memory
        )
        return
    if object_store_memory is not None:
        logging.getLogger(__name__).warning(
            "--object-store-memory ignored: joining a running Ray, whose store was sized at "
            "`ray start`"
        )
    ray.init(address=address, log_to_driver=True)


def print_summary(summary: Any, out: Any = None) -> None:
    out = out or sys.stdout
    rows = [
        ("run", summary.run_id),
        ("listed", summary.listed),
        ("skipped", f"{summary.skipped_by_extension} (not image extensions)"),
        ("unchanged", f"{summary.unchanged} (already embedded)"),
        ("embedded", summary.embedded),
        (
            "failed",
            f"{summary.failed}" + (f" (see {summary.output}/errors)" if summary.failed else ""),
        ),
        ("deleted", f"{summary.deleted} (gone from the input)"),
        ("wall time", f"{summary.wall_seconds:.1f} s"),
        ("images/s", f"{summary.images_per_second:.2f}"),
        ("table", f"{summary.output}/embeddings  (manifest: {summary.output}/_manifest.json)"),
    ]
    print(f"{PROG}: committed", file=out)
    for key, value in rows:
        print(f"  {key:<10} {value}", file=out)


STATUS_COLUMNS = (
    "run",
    "status",
    "finished",
    "listed",
    "unchanged",
    "embedded",
    "failed",
    "deleted",
    "images/s",
)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.storage_options)
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    return options


def print_table(rows: Sequence[Sequence[Any]], out: Any = None) -> None:
    """Columns padded to their widest cell, first row as the header."""
    out = out or sys.stdout
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def query_command(args: argparse.Namespace) -> int:
    from pipeline.query import nearest

    table = nearest(
        args.output,
        args.image,
        k=args.k,
        weights=args.weights,
        seed=args.seed,
        storage_options=_options(args),
    )
    rows: list[Sequence[Any]] = [("rank", "distance", "uri", "width", "height")]
    for r in table.to_pylist():
        rows.append(
            (r["rank"], f"{r['distance']:.4f}", r["uri"], r["original_width"], r["original_height"])
        )
    print_table(rows)
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


def status_command(args: argparse.Namespace, out: Any = None) -> int:
    from pipeline.manifest import read_manifest

    options = _options(args)
    manifest = read_manifest(args.output, storage_options=options)
    if manifest is None:
        raise PipelineError(f"no committed run under {args.output}")
    rows = [STATUS_COLUMNS]
    for run in manifest["runs"]:
        counts = run.get("counts", {})
        rows.append(
            (
                run["run_id"],
                run.get("status", "committed"),
                run.get("finished_at", ""),
                *(
                    str(counts.get(k, ""))
                    for k in ("listed", "unchanged", "embedded", "failed", "deleted")
                ),
                f"{run.get('images_per_second', 0):.2f}",
            )
        )
    print_table(rows, out)
    return 0


def run_command(args: argparse.Namespace) -> int:
    from pipeline.plan import execute_run

    prepared = prepare_and_start_ray(config_from_args(args), args.address)
    summary = execute_run(prepared)
    print_summary(summary)
    return 0


def report_failure(exc: PipelineError) -> int:
    """Print the one line a failed command owes its user; return the exit status."""
    from pipeline.plan import ErrorRateExceededError

    print(f"{PROG}: error: {exc}", file=sys.stderr)
    return EXIT_BAD_DATA if isinstance(exc, ErrorRateExceededError) else EXIT_FAILED


SECRET_OPTION_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "session_token",
        "access_key",
        "secret_key",
    }
)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def secret_values(storage_options: dict[str, Any], environ: Mapping[str, str]) -> set[str]:
    """Every credential this process could print: storage options and the AWS env vars."""
    found: set[str] = set()

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k).lower())
        elif isinstance(value, str) and key in SECRET_OPTION_KEYS and len(value) >= 4:
            found.add(value)

    walk(storage_options)
    found.update(environ[name] for name in SECRET_ENV if len(environ.get(name, "")) >= 4)
    return found


class RedactSecrets(logging.Filter):
    """Replace any known credential in a log record by ``***`` (defence in depth: the pipeline
    never logs one, and third-party loggers stay at WARNING)."""

    def __init__(self, secrets: set[str]) -> None:
        super().__init__()
        self.secrets = sorted(secrets, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for secret in self.secrets:
            redacted = redacted.replace(secret, "***")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_logging(level: str, secrets: set[str]) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries (botocore logs request headers at DEBUG) stay at WARNING whatever --log-level.
    root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(level)
    logging.getLogger("jobs").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embed-images`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(
        getattr(args, "log_level", "INFO"),
        secret_values(getattr(args, "storage_options", {}), os.environ),
    )
    try:
        if args.command == "run":
            return run_command(args)
        if args.command == "status":
            return status_command(args)
        if args.command == "query":
            return query_command(args)
        if args.command == "export":
            return export_command(args)
    except PipelineError as exc:
        return report_failure(exc)
    except OSError as exc:
        # An I/O failure after the checks (a store that went away mid-run): nothing was
        # committed, since the manifest is written last.
        return report_failure(PipelineError(f"I/O failure, nothing committed: {exc}"))
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
