"""The nightly incremental run, as a Ray job entry point. Same flags as ``embed-images run``:

    ray job submit --submission-id embed-nightly-$(date -u +%F) --working-dir . -- \\
        python -m jobs.nightly --input s3://bucket/photos/ --output s3://bucket/embeddings/resnet50/

It embeds only images that are new or changed since the committed runs, under a dated run id
(``YYYYMMDDTHHMMSSZ-nightly``). Two guards against a double trigger: Ray refuses a second job
with the same ``--submission-id``, and the job itself exits 0 without work when the output
already holds a committed nightly run for that date (``--date``, default today in UTC).

Exit status, for schedulers (the same as ``embed-images run``): 0 committed (or already done
for that date); 1 failed, nothing more committed, a retry may succeed; 2 a retry cannot help
(bad command line, input not found, another model in the output, a bad manifest); 3 too many
images failed (``--max-error-rate``), fix the data rather than retry; 130 or 143 stopped by
SIGINT or SIGTERM.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence

from pipeline.config import PROG
from pipeline.manifest import Manifest
from pipeline.options import (
    CommandLineParser,
    add_run_arguments,
    config_from_args,
    configure_command_logging,
    parse_run_args,
)
from pipeline.output import Output
from pipeline.runtime import run_and_report, run_guarded


def nightly_run_id(date: dt.date, now: dt.datetime) -> str:
    """``YYYYMMDDTHHMMSSZ-nightly``: sorts in time with other run ids and names its date."""
    return f"{date:%Y%m%d}T{now:%H%M%S}Z-nightly"


def already_ran(manifest: Manifest | None, date: dt.date) -> str | None:
    """The committed nightly run id for ``date``, if there is one."""
    for run in manifest.runs if manifest else ():
        if (
            run.run_id.startswith(f"{date:%Y%m%d}T")
            and run.run_id.endswith("-nightly")
            and run.committed
        ):
            return run.run_id
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandLineParser(prog="python -m jobs.nightly", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument(
        "--date",
        type=dt.date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="the night this run is for (default: today, UTC)",
    )
    args = parse_run_args(parser, parser, list(sys.argv[1:] if argv is None else argv))
    configure_command_logging(args)
    if args.full:
        parser.error("--full is not for the nightly job: run `embed-images run --full` by hand")
    now = dt.datetime.now(dt.UTC)
    date = args.date or now.date()

    def nightly() -> int:
        config = config_from_args(args)
        # Read once: the guard and the run's diff and commit share this snapshot.
        snapshot = Output(config.output, config.fs_options()).snapshot()
        done = already_ran(snapshot.manifest, date)
        if done:
            print(f"{PROG} nightly: {date} already committed as run {done}; nothing to do")
            return 0
        return run_and_report(
            config,
            args.address,
            run_id=nightly_run_id(date, now),
            snapshot=snapshot,
            verbose=args.log_level == "DEBUG",
            progress=args.progress,
        )

    # The same error path as `embed-images run`: one line, the same exit statuses.
    return run_guarded(nightly)


if __name__ == "__main__":
    sys.exit(main())
