"""Options declared once: every ``EmbedConfig`` field is a flag, a ``--config`` key and a row
of ``docs/options.md``, all made from the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import EmbedConfig
from pipeline.options import CommandLineParser, add_run_arguments, options_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_the_options_page_is_what_the_fields_make() -> None:
    page = (ROOT / "docs" / "options.md").read_text()
    assert page == options_markdown(), (
        "docs/options.md is stale: run `python -m pipeline.options > docs/options.md`"
    )


def test_every_field_is_a_flag_with_its_default_and_a_row_of_the_page() -> None:
    run = CommandLineParser(prog="embed-images run")
    add_run_arguments(run)
    flags = {o: a for a in run._actions for o in a.option_strings}
    page = options_markdown()
    for field in dataclasses.fields(EmbedConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in flags, flag
        assert flags[flag].dest == field.name
        assert f"| `{flag}`" in page
        if field.default is not dataclasses.MISSING:
            assert run.get_default(field.name) == field.default


def test_a_config_file_key_takes_the_fields_own_parsing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.cli import build_parsers
    from pipeline.options import config_from_args, parse_run_args

    config = tmp_path / "run.toml"
    config.write_text(
        'input = "in"\noutput = "out"\nconcurrency = "1,4"\ndecode-memory = "1GiB"\n'
        "storage_options = { anon = true }\n"
    )
    parser, run = build_parsers()
    args = parse_run_args(parser, run, ["run", "--config", str(config), "--seed", "3"])
    made = config_from_args(args)
    assert (made.concurrency, made.decode_memory, made.seed) == ((1, 4), 2**30, 3)
    assert made.storage_options == {"anon": True}


def test_a_bad_value_names_the_flag_in_one_line(capsys) -> None:  # type: ignore[no-untyped-def]
    run = CommandLineParser(prog="embed-images run")
    add_run_arguments(run)
    with pytest.raises(SystemExit) as stop:
        run.parse_args(["--decode-memory", "lots"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--decode-memory: 'lots' is not a size" in err
