"""The flags of a run, made from ``EmbedConfig``'s fields (:func:`pipeline.config.option`): the
argparse arguments, the ``--config`` TOML keys and ``docs/options.md`` all come from there.

    python -m pipeline.options > docs/options.md      # regenerate the options page
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pipeline.config import CLUSTER, EXIT_USAGE, IO, EmbedConfig

GROUPS = (IO, "model", "performance", CLUSTER)


class CommandLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        # One line, saying what to fix, instead of argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags of a run (``embed-images run`` and the ``jobs/`` entry points): one per
    ``EmbedConfig`` field, with its default, then the few that only a command line has."""
    from pipeline.progress import PROGRESS_MODES

    groups = {name: run.add_argument_group(name) for name in GROUPS}
    groups[IO].add_argument(
        "--config",
        metavar="FILE.toml",
        help="read options from a TOML file; flags on the command line override it",
    )
    groups[IO].add_argument(
        "--dry-run",
        action="store_true",
        help="list the input, diff it against the output, print what a run would do; "
        "starts no Ray, loads no weights, writes nothing",
    )
    for field in dataclasses.fields(EmbedConfig):
        _add_field(groups[field.metadata["group"]], field)
    run.set_defaults(**config_defaults())
    cluster = groups[CLUSTER]
    cluster.add_argument(
        "--address",
        metavar="ADDRESS",
        help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)",
    )
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


def add_config_arguments(parser: argparse.ArgumentParser, *names: str) -> None:
    """Some ``EmbedConfig`` fields' flags, with their defaults, for another command."""
    fields = {f.name: f for f in dataclasses.fields(EmbedConfig)}
    for name in names:
        _add_field(parser, fields[name])
    defaults = config_defaults()
    parser.set_defaults(**{name: defaults[name] for name in names})


def _add_field(group: Any, field: dataclasses.Field[Any]) -> None:
    meta = field.metadata
    flag = "--" + field.name.replace("_", "-")
    kind = _annotation(field.name)
    if kind is bool:
        group.add_argument(flag, action="store_true", help=meta["help"])
        return
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    # A field's own parser gives argparse its message; int and float keep argparse's own.
    parse = argparse_type(meta["parse"]) if meta["parse"] else None
    group.add_argument(
        flag,
        type=parse or (None if choices else _scalar(kind)),
        choices=choices,
        metavar=meta["metavar"],
        help=meta["help"],
    )


def _annotation(name: str) -> Any:
    return typing.get_type_hints(EmbedConfig)[name]


def _scalar(kind: Any) -> Callable[[str], Any] | None:
    """``int``, ``float`` or ``str`` from ``X`` or ``X | None``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    return args[0] if args[0] in (int, float) else None


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names it in errors
    return convert


def config_defaults() -> dict[str, Any]:
    """``EmbedConfig``'s defaults, which the flags take (and ``--help`` prints)."""
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(EmbedConfig):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


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


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    """The run's ``EmbedConfig``, from the flags named after its fields (the rest is ignored)."""
    given = vars(args)
    return EmbedConfig(
        **{f.name: given[f.name] for f in dataclasses.fields(EmbedConfig) if f.name in given}
    )


def configure_command_logging(args: argparse.Namespace) -> None:
    """Logging for a command line: its level, and every credential it names redacted."""
    from pipeline.logs import configure_logging

    configure_logging(
        getattr(args, "log_level", "INFO"),
        storage_options=getattr(args, "storage_options", {}),
        urls=[getattr(args, name, None) for name in ("weights", "input", "output", "input_list")]
        + [getattr(args, "endpoint_url", None)],
    )


def options_markdown() -> str:
    """``docs/options.md``: every flag of ``embed-images run``, by section, from the parser."""
    run = CommandLineParser(prog="embed-images run")
    add_run_arguments(run)
    fields = {f.name: f for f in dataclasses.fields(EmbedConfig)}
    lines = [
        "# Options of `embed-images run`",
        "",
        "Generated by `python -m pipeline.options > docs/options.md` from the `EmbedConfig`",
        "fields (`pipeline/config.py`), where each option is declared once; a test fails when",
        "this page is stale. Each option is also a key of a `--config` TOML file (its field",
        "name, or the flag without dashes), and a keyword of `embed_images()`.",
    ]
    for group in run._action_groups[2:]:  # after argparse's positionals and options
        lines += ["", f"## {group.title}", "", "| flag | default | what it does |"]
        lines += ["| --- | --- | --- |"]
        lines += [_row(run, action, fields) for action in group._group_actions]
    return "\n".join(lines) + "\n"


def _row(run: argparse.ArgumentParser, action: argparse.Action, fields: dict[str, Any]) -> str:
    flag = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.metavar:
        flag += f" `{action.metavar}`"
    elif action.choices:
        flag += " `{" + ",".join(map(str, action.choices)) + "}`"
    default = run.get_default(action.dest)
    constant = action.const is not None  # -v: its dest's default is --log-level's
    shown = "" if default is None or default is False or constant else f"`{default}`"
    text = (action.help or "") % {"default": default}
    field = fields.get(action.dest)
    if field is not None and field.metadata["details"]:
        text += ". " + field.metadata["details"]
    cells = (flag, shown, text)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


if __name__ == "__main__":
    sys.stdout.write(options_markdown())
