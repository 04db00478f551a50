"""The command line: --help, bad flags and bad inputs exit non-zero with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, module: str = "pipeline.cli") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_contract_options() -> None:
    result = run("run", "--help")
    assert result.returncode == 0
    for option in (
        "--input",
        "--output",
        "--weights",
        "--weights-sha256",
        "--resize",
        "--batch-size",
        "--concurrency",
        "--num-gpus",
        "--precision",
        "--normalize",
        "--limit",
        "--endpoint-url",
        "--storage-options",
        "--address",
    ):
        assert option in result.stdout, option


def test_job_entry_point_has_the_same_flags() -> None:
    result = run("--help", module="jobs.embed_images")
    assert result.returncode == 0 and "--weights-sha256" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--input", "a", "--output", "b", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--input", "a"], "required: --output"),
        (["run", "--input", "a", "--output", "b", "--resize", "zoom"], "invalid choice: 'zoom'"),
        (["run", "--input", "a", "--output", "b", "--concurrency", "4,1"], "MIN <= MAX"),
        (["run", "--input", "a", "--output", "b", "--storage-options", "{nope"], "not valid JSON"),
        (["run", "--input", "a", "--output", "b", "--batch-size", "0"], "--batch-size 0"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_missing_input_fails_fast_with_one_line(tmp_path: Path) -> None:
    result = run(
        "run",
        "--input",
        str(tmp_path / "nope"),
        "--output",
        str(tmp_path / "out"),
        "--weights",
        "random",
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"embed-images: error: input not found: {tmp_path / 'nope'}"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_output_inside_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    result = run(
        "run",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "in" / "out"),
        "--weights",
        "random",
    )
    assert result.returncode == 1 and "is inside input" in result.stderr


def test_bad_weights_file_fails_before_ray(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "w.pth").write_bytes(b"junk")
    result = run(
        "run",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--weights",
        str(tmp_path / "w.pth"),
    )
    assert result.returncode == 1 and "not a loadable torch state_dict" in result.stderr
    assert "Traceback" not in result.stderr
