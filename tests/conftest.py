"""Shared fixtures: images made by Pillow, a real moto S3 server on 127.0.0.1, one local Ray."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.raycluster import free_ports

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- images


def _exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def image_bytes(
    size: tuple[int, int],
    *,
    mode: str = "RGB",
    fmt: str = "JPEG",
    seed: int = 0,
    orientation: int | None = None,
) -> bytes:
    """A smooth, seeded test image (gradients + noise) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            (xx * 255 // max(1, width - 1)),
            (yy * 255 // max(1, height - 1)),
            ((xx + yy) * 127 // max(1, width + height - 2)),
        ],
        axis=-1,
    ).astype(np.int16)
    noise = rng.integers(-20, 20, size=base.shape, dtype=np.int16)
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        kwargs["exif"] = _exif_with_orientation(orientation)
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    return image_bytes


def corpus_files() -> dict[str, tuple[bytes, tuple[int, int] | None, str | None]]:
    """name -> (bytes, upright (width, height) or None for failures, expected error_type)."""
    truncated = image_bytes((64, 48), seed=9)
    return {
        "rgb.jpg": (image_bytes((64, 48), seed=1), (64, 48), None),
        "sub/dir/plain.png": (image_bytes((40, 30), fmt="PNG", seed=2), (40, 30), None),
        # Stored 60x40, EXIF orientation 6 (rotate 90): a person sees 40x60.
        "rotated.jpg": (image_bytes((60, 40), seed=3, orientation=6), (40, 60), None),
        "gray.png": (image_bytes((33, 21), mode="L", fmt="PNG", seed=4), (33, 21), None),
        "alpha.png": (image_bytes((30, 30), mode="RGBA", fmt="PNG", seed=5), (30, 30), None),
        "palette.gif": (image_bytes((25, 35), mode="P", fmt="GIF", seed=6), (25, 35), None),
        "photo.webp": (image_bytes((50, 40), fmt="WEBP", seed=7), (50, 40), None),
        "UPPER CASE é.JPG": (image_bytes((45, 45), seed=8), (45, 45), None),
        "cmyk.jpg": (image_bytes((20, 28), mode="CMYK", seed=10), (20, 28), None),
        "deep.png": (image_bytes((24, 18), mode="I;16", fmt="PNG", seed=11), (24, 18), None),
        "bad.jpg": (b"this is not an image at all", None, "not_an_image"),
        "truncated.jpg": (truncated[: len(truncated) // 2], None, "truncated"),
        "empty.png": (b"", None, "empty"),
        "notes.txt": (b"not listed", None, None),
    }


def write_corpus(root: Path) -> dict[str, tuple[bytes, tuple[int, int] | None, str | None]]:
    files = corpus_files()
    for name, (data, _, _) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.fixture
def corpus(
    tmp_path: Path,
) -> tuple[Path, dict[str, tuple[bytes, tuple[int, int] | None, str | None]]]:
    root = tmp_path / "images"
    return root, write_corpus(root)


# ----------------------------------------------------------------------------- weights


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet50 state_dict saved by the test itself (seeded), as a user's checkpoint."""
    import torch
    from torchvision.models import resnet50

    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "resnet50-test.pth"
    torch.save(resnet50(weights=None).state_dict(), path)
    return path


# ----------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[None]:
    """Fake credentials for the whole session, set before Ray starts so its workers get them.

    The real profile files are hidden too, and everything is restored at the end.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        # Never ask an instance-metadata endpoint: tests talk to 127.0.0.1 only.
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        yield


@pytest.fixture(scope="session")
def s3_endpoint(aws_credentials: None) -> Iterator[str]:
    """moto's S3 server over real HTTP on 127.0.0.1 (as s3fs's own test suite runs it)."""
    import logging

    from moto.server import ThreadedMotoServer

    # The server's own request lines (werkzeug, INFO) are not the command's output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[tuple[object, str]]:
    """A fresh bucket and an s3fs filesystem pointed at the moto server."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket


# ----------------------------------------------------------------------------- outputs


@pytest.fixture(params=["local", "s3"])
def output_uri(request, tmp_path) -> tuple[str, dict[str, str]]:  # type: ignore[no-untyped-def]
    """An empty output on local disk, and one on moto's S3."""
    if request.param == "s3":
        _, bucket = request.getfixturevalue("s3_bucket")
        return f"s3://{bucket}/out", {"endpoint_url": request.getfixturevalue("s3_endpoint")}
    return str(tmp_path / "out"), {}


TEST_MODEL_SHA256 = "00" * 32


def stage_rows(
    output: str,
    run_id: str,
    uris: list[str],
    storage_options: dict[str, str] | None = None,
    *,
    version: str = "v1",
    digests: bool = False,
) -> dict[str, list[str]]:
    """Stage one embeddings file of ``uris`` for ``run_id`` (zero vectors, random:seed=0
    weights; with ``digests``, the sha256 of each URI as its ``content_sha256``), as a writer
    task does; returns what ``Output.commit`` takes as ``staged``."""
    from pipeline.embed import ModelIdentity
    from pipeline.output import Output
    from pipeline.reuse import CONTENT_COLUMN
    from pipeline.write import file_metadata, write_batch

    model = ModelIdentity(
        weights="random:seed=0",
        weights_sha256=TEST_MODEL_SHA256,
        normalized=False,
        precision="fp32",
    )
    n = len(uris)
    batch = {
        "uri": np.array(uris, dtype=object),
        "file_size": np.ones(n, dtype=np.int64),
        "original_width": np.ones(n, dtype=np.int32),
        "original_height": np.ones(n, dtype=np.int32),
        "format": np.array(["PNG"] * n, dtype=object),
        "error_type": np.array([""] * n, dtype=object),
        "error_message": np.array([""] * n, dtype=object),
        "embedding": np.zeros((n, 2048), dtype=np.float32),
        "source_version": np.array([version] * n, dtype=object),
    }
    if digests:
        batch[CONTENT_COLUMN] = np.array(
            [hashlib.sha256(u.encode()).digest() for u in uris], dtype=object
        )
    out = write_batch(
        batch,
        staging_uri=Output(output, storage_options).staging_uri(run_id),
        storage_options=storage_options or {},
        metadata=file_metadata(model=model, preprocessing={}, run_id=run_id),
    )
    return {"embeddings": list(out["path"])}


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_session(aws_credentials: None) -> Iterator[None]:
    """One real local Ray for the session, 2 CPUs (as Ray's ``ray_start_regular_shared``)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# ----------------------------------------------------------------------------- docs


@pytest.fixture(scope="session")
def doc_examples() -> dict[str, str]:
    """The tested examples of README.md and docs/*.md: code blocks right after a
    `<!-- tested: NAME -->` line, by name."""
    root = Path(__file__).resolve().parents[1]
    found: dict[str, str] = {}
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        pattern = r"<!-- tested: (\w+) -->\n```(?:python|sql)\n(.*?)```"
        for name, code in re.findall(pattern, page.read_text(), re.S):
            assert name not in found, f"two examples named {name}"
            found[name] = code
    return found


# ----------------------------------------------------------------------------- command lines


def run_args(input: Any, output: Any, *extra: Any, weights: Any = "random") -> list[str]:
    """``embed-images run`` arguments: ``--input``, ``--output``, ``--weights`` (seeded random
    weights unless told), then ``extra``, each as a string."""
    args = ["run", "--input", str(input), "--output", str(output), "--weights", str(weights)]
    return args + [str(e) for e in extra]


# ----------------------------------------------------------------------------- processes


def command_lines() -> list[tuple[int, str]]:
    """``(pid, command line)`` of this machine's live processes."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        found.append((int(cmdline.parent.name), line))
    return found


# ----------------------------------------------------------------------------- a killed driver


def kill_stalled_driver(
    tmp_path: Path,
    options: dict[str, object],
    *,
    stage: str,
    stall_after: int,
    ready: Callable[[], bool],
    timeout: float = 240,
) -> None:
    """SIGKILL a run's driver mid-run, as a crash or an OOM kill would.

    The run gets a driver process of its own, with its own local Ray. Its model stage,
    ``stage`` (``module:Class``), stalls after ``stall_after`` batches, so the run cannot end
    first. Once ``ready()`` holds, the driver alone is killed, then its process group (the
    local Ray it started).
    """
    module, name = stage.split(":")
    script = tmp_path / "driver.py"
    script.write_text(
        "import time, ray\n"
        f"from {module} import {name}\n"
        "from pipeline.config import EmbedConfig\n"
        "from pipeline.run import execute_run, prepare_run\n"
        f"class Stall({name}):\n"
        "    calls = 0\n"
        "    def __call__(self, batch):\n"
        "        type(self).calls += 1\n"
        f"        if type(self).calls > {stall_after}:\n"
        "            time.sleep(600)\n"
        "        return super().__call__(batch)\n"
        f"prepared = prepare_run(EmbedConfig(**{options!r}))\n"
        "ray.init(include_dashboard=False)\n"
        "execute_run(prepared, embedder=Stall)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
    driver = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and driver.poll() is None and not ready():
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone
        driver.wait(timeout=30)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # its local Ray too
        except ProcessLookupError:
            pass


def zero_byte_images(folder: Path, n: int) -> None:
    """``n`` empty ``.jpg`` files: an ``empty`` error row each, fast (nothing to decode)."""
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"{i:05d}.jpg").write_bytes(b"")  # an `empty` error row each: no decode


# ----------------------------------------------------------------------------- near duplicates

GROUPS = 4


def near_duplicate_photos(root: Path) -> dict[str, int]:
    """Four distinct pictures, each with a re-encoded copy and a rescaled copy."""
    from bench.corpus import photo_like

    root.mkdir(parents=True)
    group_of = {}
    for g in range(GROUPS):
        image = photo_like((320, 240), seed=1000 + g)
        copies = {
            f"g{g}-original.png": (image, "PNG", {}),
            f"g{g}-reencoded.jpg": (image, "JPEG", {"quality": 40}),
            f"g{g}-rescaled.jpg": (
                image.resize((200, 150), Image.Resampling.BILINEAR),
                "JPEG",
                {"quality": 90},
            ),
        }
        for name, (picture, fmt, options) in copies.items():
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt, **options)
            (root / name).write_bytes(buffer.getvalue())
            group_of[str(root / name)] = g
    return group_of


@pytest.fixture(scope="session")
def near_duplicates(tmp_path_factory, ray_session) -> tuple[Path, dict[str, int]]:  # type: ignore[no-untyped-def]
    """An output of :func:`near_duplicate_photos`, normalized, and each photo's group."""
    from pipeline.cli import main

    base = tmp_path_factory.mktemp("search")
    groups = near_duplicate_photos(base / "photos")
    output = base / "out"
    args = run_args(base / "photos", output)
    assert main([*args, "--normalize", "--batch-size", "6"]) == 0
    return output, groups
