"""The command line: --help, bad flags and bad inputs exit non-zero with one clear line."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import command_lines, run_args

from pipeline.logs import drop_lines

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
        (["run", "--input", "a", "--output", "b", "--decode-cpus", "0"], "--decode-cpus 0"),
        (["run", "--input", "a", "--output", "b", "--write-cpus", "0"], "--write-cpus 0"),
        (["run", "--input", "a", "--output", "b", "--decode-memory", "0"], "--decode-memory 0"),
        (["run", "--input", "a", "--output", "b", "--object-store-memory", "lots"], "not a size"),
        (["run", "--input", "a", "--output", "b", "--object-store-memory", "1MiB"], "78 MiB"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_missing_input_fails_fast_with_one_line(tmp_path: Path) -> None:
    result = run(
        *run_args(tmp_path / "nope", tmp_path / "out"),
    )
    assert result.returncode == 2  # no retry can help
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"embed-images: error: input not found: {tmp_path / 'nope'}"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_output_inside_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    result = run(
        *run_args(tmp_path / "in", tmp_path / "in" / "out"),
    )
    assert result.returncode == 2 and "is inside input" in result.stderr


def test_bad_weights_file_fails_before_ray_with_one_line(tmp_path: Path) -> None:
    # Junk is refused from its first bytes, before Ray starts (a file that is a checkpoint but
    # not a ResNet50 loads while Ray starts and fails once both are done).
    (tmp_path / "in").mkdir()
    (tmp_path / "w.pth").write_bytes(b"junk")
    result = run(
        *run_args(tmp_path / "in", tmp_path / "out", weights=tmp_path / "w.pth"),
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    # One line: a Ray that had started would have printed its own.
    assert len(lines) == 1 and "not a torch checkpoint" in lines[0], result.stderr
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_cpu_actors_that_take_every_cpu_are_refused_not_left_waiting(
    tmp_path: Path, make_image
) -> None:  # type: ignore[no-untyped-def]
    # As many CPU model actors as the machine has CPUs, a CPU reserved each: nothing could
    # decode, and the run used to wait forever. The local Ray is the command's own: refused.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(make_image((40, 30), seed=0))
    cpus = os.cpu_count() or 1
    result = run(
        *run_args(tmp_path / "in", tmp_path / "out", "--concurrency", cpus),
    )
    assert result.returncode == 2  # a bad option value: no retry can help
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"embed-images: error: --concurrency {cpus}: CPU model actors"), last
    assert "nothing would be left to decode on" in last and "--model-cpus" in last
    assert not (tmp_path / "out" / "_manifest.json").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing bucket", "input not found: s3://no-such-bucket-here/photos"),
        ("missing prefix", "input not found: s3://{bucket}/nothing-here"),
        ("empty input", "no images under s3://{bucket}/docs (1 other files skipped"),
        ("missing credentials", "no usable AWS credentials for s3://{bucket}/docs"),
        ("unwritable output", "cannot write to output s3://no-such-bucket-here/out"),
    ],
)
def test_bad_storage_fails_fast_with_one_line(
    case, message, s3_bucket, s3_endpoint, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import os

    s3, bucket = s3_bucket
    s3.pipe(f"{bucket}/docs/readme.txt", b"not an image")
    s3.pipe(f"{bucket}/photos/a.jpg", b"\xff\xd8")
    inputs = {
        "missing bucket": "s3://no-such-bucket-here/photos",
        "missing prefix": f"s3://{bucket}/nothing-here",
        "unwritable output": f"s3://{bucket}/photos",
    }
    output = (
        "s3://no-such-bucket-here/out" if case == "unwritable output" else str(tmp_path / "out")
    )
    env = dict(os.environ)
    if case == "missing credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.pop(name, None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--input",
            inputs.get(case, f"s3://{bucket}/docs"),
            "--output",
            output,
            "--weights",
            "random",
            "--endpoint-url",
            s3_endpoint,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # A missing or empty input: no retry can help (2); credentials or a bucket may come (1).
    assert result.returncode == (1 if case in ("missing credentials", "unwritable output") else 2)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("embed-images: error: ") and message.format(bucket=bucket) in last, (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "_manifest.json").exists()
    assert not s3.exists("no-such-bucket-here")  # no bucket was created on the way


def test_sizes_read_like_ray_users_write_them() -> None:
    from pipeline.values import parse_byte_size as _byte_size

    assert _byte_size("2GiB") == 2 * 2**30
    assert _byte_size("512MiB") == 512 * 2**20
    assert _byte_size("2GB") == 2 * 10**9
    assert _byte_size("1000") == 1000


def test_object_store_memory_sizes_the_local_ray_it_starts() -> None:
    code = (
        "import ray\n"
        "from pipeline.runtime import start_ray\n"
        "start_ray(None, object_store_memory=100 * 2**20)\n"
        "print(int(ray.cluster_resources()['object_store_memory']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip().splitlines()[-1]) == 100 * 2**20


def test_every_config_field_is_a_flag_with_the_configs_default() -> None:
    import dataclasses

    from pipeline.cli import build_parser
    from pipeline.config import EmbedConfig
    from pipeline.options import config_from_args

    args = build_parser().parse_args(["run", "--input", "a", "--output", "b"])
    assert {f.name for f in dataclasses.fields(EmbedConfig)} <= set(vars(args))
    assert config_from_args(args) == EmbedConfig(input="a", output="b")
    given = build_parser().parse_args(
        ["run", "--input", "a", "--output", "b", "--decode-memory", "1GiB", "--write-cpus", "0.5"]
    )
    config = config_from_args(given)
    assert (config.decode_memory, config.write_cpus) == (2**30, 0.5)


def test_nightly_job_takes_the_same_flags() -> None:
    result = run("--help", module="jobs.nightly")
    assert result.returncode == 0
    assert "--decode-memory" in result.stdout and "--date" in result.stdout


def test_version() -> None:
    from pipeline import __version__

    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"embed-images {__version__}"


@pytest.mark.slow
def test_a_piped_run_prints_a_few_lines_and_names_rays_log_folder(tmp_path, make_image) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(24):
        (photos / f"p{i:02d}.jpg").write_bytes(make_image((40 + i, 30), seed=i))
    command = ["run", "--input", str(photos), "--output", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def piped(*extra: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *command, "--weights", "random", *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return (result.stdout + result.stderr).splitlines()

    before = _ray_processes()
    lines = piped()
    assert len(lines) <= 15, "\n".join(lines)
    assert any("embed-images: committed" in line for line in lines)
    (logs,) = [line for line in lines if "Ray's own logs: " in line]  # named once
    # The command leaves at once (no orderly shutdown of its own Ray), and takes the Ray it
    # started with it: no process of that Ray outlives it, its agents included (left to
    # Ray's fate sharing, they outlive it by a minute, holding their ports).
    session = Path(logs.split("Ray's own logs: ")[1]).parent.name
    deadline = time.time() + 5
    while left := _processes_naming(session) + sorted(_ray_processes() - before):
        assert time.time() < deadline, left
        time.sleep(0.5)
    assert not [line for line in lines if "streaming_executor" in line or "Progress" in line]
    # Ray core's line about Ray Data's actor constructor arguments stays in Ray's log folder.
    noise = "has constructor arguments in the object store"
    assert not [line for line in lines if noise in line]
    (driver_log,) = Path(logs.split("Ray's own logs: ")[1]).glob("python-core-driver-*.log")
    assert noise in driver_log.read_text()
    # -v brings Ray's and Ray Data's own lines back, Ray core's included.
    verbose = piped("-v", "--full")
    assert [line for line in verbose if "streaming_executor" in line], "\n".join(verbose)
    assert [line for line in verbose if noise in line], "\n".join(verbose)


def test_what_a_killed_process_wrote_still_passes_the_stderr_filter() -> None:
    """The filter is a process of its own: a driver SIGKILLed mid-line loses nothing it wrote
    to stderr, and Ray core's noise is still dropped."""
    code = (
        "import os, signal\n"
        "from pipeline.logs import RAY_CORE_NOISE, native_stderr_filtered\n"
        "with native_stderr_filtered():\n"
        "    os.write(2, b'before\\n[2026 E 1 1] core_worker.cc: ' + RAY_CORE_NOISE[0].encode()"
        " + b'\\n[2026 E 1 1] a real error\\nthe last, unfinished')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == -9
    assert result.stderr == b"before\n[2026 E 1 1] a real error\nthe last, unfinished"


def test_the_stderr_filter_drops_only_its_lines_and_holds_back_nothing_else() -> None:
    source_read, source_write = os.pipe()
    sink_read, sink_write = os.pipe()
    filter_thread = threading.Thread(
        target=drop_lines, args=(source_read, sink_write, [b"NOISE"]), daemon=True
    )
    filter_thread.start()

    def send(data: bytes) -> None:
        os.write(source_write, data)
        time.sleep(0.05)

    def received() -> bytes:
        ready, _, _ = select.select([sink_read], [], [], 0.5)
        return os.read(sink_read, 65536) if ready else b""

    send(b"INFO first line\n")
    assert received() == b"INFO first line\n"
    send(b"\r3/24 images \x1b[K")  # a progress bar's partial line passes on at once
    assert received() == b"\r3/24 images \x1b[K"
    send(b"\r4/24 images\n[2026-11-27 E 1 1] core_worker.cc: NO")  # a Ray line: judged whole
    assert received() == b"\r4/24 images\n"
    send(b"ISE here\n[2026-11-27 E 1 1] core_worker.cc: a real error\n")
    assert received() == b"[2026-11-27 E 1 1] core_worker.cc: a real error\n"
    send(b"[partial with no end")
    assert received() == b""
    os.close(source_write)
    filter_thread.join(timeout=5)
    assert received() == b"[partial with no end"  # the end of the input lets it go
    os.close(sink_write)
    os.close(sink_read)
    os.close(source_read)


def _ray_processes() -> set[str]:
    """``pid command`` of this machine's Ray head and agent processes (any session's; not
    its workers, which a Ray that runs on, as the tests' own, starts and ends as it likes)."""
    names = ("raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
    return {
        f"{pid} {line[:200]}"
        for pid, line in command_lines()
        if any(name in line for name in names)
    }


def _processes_naming(text: str) -> list[str]:
    """Command lines of this machine's processes that contain ``text``."""
    return [line[:200] for _, line in command_lines() if text in line]


def test_a_config_file_gives_the_options_and_flags_override_it(tmp_path: Path) -> None:
    from pipeline.cli import build_parsers
    from pipeline.options import config_from_args, parse_run_args

    config_file = tmp_path / "run.toml"
    config_file.write_text(
        'input = "s3://bucket/photos/"\n'
        'output = "s3://bucket/out/"\n'
        "batch-size = 256\n"
        'concurrency = "1,4"\n'
        'object_store_memory = "2GiB"\n'
        "normalize = true\n"
        "storage_options = { anon = true }\n"
    )
    parser, run_parser = build_parsers()
    argv = ["run", "--config", str(config_file), "--batch-size", "64"]
    config = config_from_args(parse_run_args(parser, run_parser, argv))
    assert (config.input, config.output) == ("s3://bucket/photos/", "s3://bucket/out/")
    assert config.batch_size == 64  # the flag wins
    assert config.concurrency == (1, 4) and config.object_store_memory == 2 * 2**30
    assert config.normalize is True and dict(config.storage_options) == {"anon": True}


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus = 1\n", "unknown option 'bogus'"),
        ('concurrency = "4,1"\n', "MIN <= MAX"),
        ("input = [\n", "not valid TOML"),
        ('input = "a"\n', "the following arguments are required: --output"),
    ],
)
def test_a_bad_config_file_exits_2_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    config_file = tmp_path / "run.toml"
    config_file.write_text(text)
    result = run("run", "--config", str(config_file))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_run_help_groups_options_and_explains_exit_codes() -> None:
    result = run("run", "--help")
    for heading in ("input and output:", "model:", "performance:", "cluster, storage and logs:"):
        assert heading in result.stdout, heading
    assert "exit status:" in result.stdout and "130" in result.stdout
    assert "--config run.toml" in result.stdout
