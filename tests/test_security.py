"""Nothing let in, nothing let out: credentials never reach logs or outputs; keys never paths."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from pipeline.logs import RedactSecrets, secret_values

ROOT = Path(__file__).resolve().parents[1]


def test_secret_values_come_from_options_and_environment() -> None:
    options = {
        "key": "AKIAOPTION",
        "client_kwargs": {"aws_session_token": "TOKENVALUE"},
        "anon": False,
    }
    found = secret_values(options, {"AWS_SECRET_ACCESS_KEY": "ENVSECRET", "HOME": "/root"})
    assert found == {"AKIAOPTION", "TOKENVALUE", "ENVSECRET"}


def test_redaction_filter_masks_secrets_in_records() -> None:
    record = logging.LogRecord(
        "x", logging.DEBUG, __file__, 1, "auth %s done", ("Credential=AKIAXYZ/",), None
    )
    assert RedactSecrets({"AKIAXYZ"}).filter(record)
    assert record.getMessage() == "auth Credential=***/ done"


@pytest.mark.slow
def test_no_credential_in_anything_the_run_wrote(
    tmp_path, s3_bucket, s3_endpoint, make_image
) -> None:  # type: ignore[no-untyped-def]
    s3, bucket = s3_bucket
    for i in range(2):
        s3.pipe(f"{bucket}/photos/img{i}.jpg", make_image((40, 30), seed=i))
    s3.pipe(f"{bucket}/photos/broken.jpg", b"junk")
    # An object key that would climb out of a folder if anyone made a local path of it.
    s3.pipe(f"{bucket}/photos/../../escape.jpg", make_image((20, 20), seed=5))

    canary = uuid.uuid4().hex.upper()
    secrets = {
        "AWS_ACCESS_KEY_ID": f"AKIA{canary[:16]}",
        "AWS_SECRET_ACCESS_KEY": f"SECRET{canary}",
        "AWS_SESSION_TOKEN": f"TOKEN{canary}",
    }
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths are limited
    workdir = tmp_path / "work"
    workdir.mkdir()
    output = workdir / "out"
    env = os.environ | secrets | {"RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "run",
                "--input",
                f"s3://{bucket}/photos/",
                "--output",
                str(output),
                "--weights",
                "random",
                "--endpoint-url",
                s3_endpoint,
                "--storage-options",
                json.dumps(
                    {
                        "key": secrets["AWS_ACCESS_KEY_ID"],
                        "secret": secrets["AWS_SECRET_ACCESS_KEY"],
                        "token": secrets["AWS_SESSION_TOKEN"],
                    }
                ),
                "--log-level",
                "DEBUG",
                "--max-error-rate",
                "1",
            ],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        written: dict[str, bytes] = {
            "stdout": result.stdout.encode(),
            "stderr": result.stderr.encode(),
        }
        for base in (workdir, Path(ray_tmp)):
            for path in base.rglob("*"):
                if path.is_file() and not path.is_symlink() and not path.name.endswith(".sock"):
                    try:
                        written[str(path)] = path.read_bytes()
                    except OSError:
                        continue
        assert len(written) > 10  # the manifest, Parquet files, Ray's logs
        assert [where for where in written if "/_reports/" in where]  # with its config
        for name, value in secrets.items():
            leaks = [where for where, data in written.items() if value.encode() in data]
            assert not leaks, f"{name} found in {leaks}"
        # Nothing was created outside the output folder.
        assert sorted(p.name for p in workdir.iterdir()) == ["out"]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
