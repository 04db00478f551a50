"""The ``embed-images`` command: parse flags into one ``EmbedConfig``, start or join Ray, run.

    embed-images run --input s3://bucket/photos/ --output s3://bucket/embeddings/resnet50/
    embed-images run --input ./photos --output ./out --weights random --limit 100

With no ``--address`` and no ``RAY_ADDRESS`` a local Ray starts; otherwise it joins that cluster.
Exit status 0 only when the run committed; otherwise one line on stderr and a non-zero status:
1 failed (retry may help), 2 bad command line, 3 too many bad images, 4 the quality gate refused
the vectors, 75 a lost node stalled the run, 130/143 stopped by a signal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.config import PROG, ConfigError, PipelineError
from pipeline.options import (
    CommandLineParser,
    add_config_arguments,
    add_run_arguments,
    config_from_args,
    configure_command_logging,
    parse_run_args,
)

if TYPE_CHECKING:
    pass


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
  4    the quality gate refused a vector with a NaN or an infinity (--gate): what
       committed before it stays, all of it finite
  75   a Ray node was lost and the model stage then stalled (--lost-node-wait):
       drained like SIGTERM; a rerun resumes once the cluster can hold the model
  130  stopped by Ctrl-C; 143 by SIGTERM, after a drain that commits what is written
       (--drain-seconds); either way a rerun resumes
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
    subs = [
        make(commands)
        for make in (
            _status_parser,
            _query_parser,
            _export_parser,
            _compact_parser,
            _duplicates_parser,
        )
    ]
    for sub in subs:
        add_config_arguments(sub, "endpoint_url", "storage_options")
    return parser, run


def _status_parser(commands: Any) -> argparse.ArgumentParser:
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
    return status


def _query_parser(commands: Any) -> argparse.ArgumentParser:
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
    return query


def _export_parser(commands: Any) -> argparse.ArgumentParser:
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
    return export


def _compact_parser(commands: Any) -> argparse.ArgumentParser:
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
    return compact


def _duplicates_parser(commands: Any) -> argparse.ArgumentParser:
    duplicates = commands.add_parser(
        "duplicates",
        help="print the groups of OUTPUT's current images that share their bytes",
        description="Print, one JSON line per group, the current images of OUTPUT whose bytes "
        "are the same (by content_sha256); with --near, also the groups whose vectors' cosine "
        "similarity is at least THRESHOLD (FAISS; largest groups first).",
    )
    duplicates.add_argument("output", metavar="OUTPUT", help="an embed-images --output")
    duplicates.add_argument(
        "--near",
        type=float,
        metavar="THRESHOLD",
        help="also group near-duplicates: cosine similarity >= THRESHOLD, in (0, 1]",
    )
    duplicates.add_argument(
        "--to", metavar="FILE", help="write the JSON lines to FILE (default: standard output)"
    )
    return duplicates


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
    from pipeline.runtime import run_and_report

    return run_and_report(
        config_from_args(args),
        args.address,
        verbose=args.log_level == "DEBUG",
        progress=args.progress,
    )


def status_command(args: argparse.Namespace) -> int:
    from pipeline.read import read_manifest
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


def duplicates_command(args: argparse.Namespace) -> int:
    import json

    from pipeline.duplicates import exact_groups, near_groups

    if args.near is not None and not 0 < args.near <= 1:
        raise ConfigError(f"--near {args.near}: a cosine similarity in (0, 1], such as 0.95")
    options = _options(args)
    groups = [*exact_groups(args.output, storage_options=options)]
    exact = len(groups)
    if args.near is not None:
        groups += near_groups(args.output, args.near, storage_options=options)
    lines = "".join(json.dumps(group) + "\n" for group in groups)
    if args.to:
        with open(args.to, "w", encoding="utf-8") as out:
            out.write(lines)
    else:
        sys.stdout.write(lines)
    near = f"; groups of near-duplicates: {len(groups) - exact}" if args.near is not None else ""
    print(f"{PROG}: groups of identical images: {exact}{near}", file=sys.stderr)
    return 0


COMMANDS = {
    "run": run_command,
    "status": status_command,
    "compact": compact_command,
    "query": query_command,
    "export": export_command,
    "duplicates": duplicates_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embed-images`` console script; returns the exit status."""
    parser, run = build_parsers()
    args = parse_run_args(parser, run, list(sys.argv[1:] if argv is None else argv))
    configure_command_logging(args)
    from pipeline.runtime import run_guarded

    return run_guarded(lambda: COMMANDS[args.command](args), committed=args.command == "run")


def console() -> NoReturn:
    """The ``embed-images`` console script: :func:`main`, then the exit.

    A process that started its own local Ray kills that Ray's processes and exits as soon
    as its output is flushed: Ray's orderly shutdown plus the interpreter's teardown take
    seconds after the summary and would buy a command line nothing. A driver that joined a
    cluster leaves it the usual way.
    """
    import logging
    import os

    from pipeline.checks import started_local_ray
    from pipeline.runtime import kill_local_ray

    status = main()
    if started_local_ray():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        kill_local_ray()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    console()
