"""Decode on the model's device: the same pixels, sizes and error rows as the CPU path.

On a machine without CUDA the device is the CPU (torchvision's libjpeg decoder): the batching,
the header checks, the fallbacks and the resize are the same code. The CUDA tests run where
torch sees a GPU (they import no Ray, so they also run on a bare GPU machine).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.decode import ImageRejectedError, decode_image
from pipeline.decode_device import decode_on_device, device_decodable
from pipeline.embed import ResNet50Embedder
from pipeline.preprocessing import preprocess_spec
from pipeline.weights import load_weights
from tests.conftest import corpus_files, image_bytes

LIMIT = 10**8
CPU = torch.device("cpu")
SIZES = [(500, 375), (375, 500), (224, 224), (300, 200), (64, 48), (1031, 17)]


def _cpu_path(data: bytes, mode: str = "center-crop") -> np.ndarray:
    return decode_image(data, preprocess_spec(mode), max_image_pixels=LIMIT).pixels


@pytest.mark.parametrize("mode", ["center-crop", "squash", "letterbox"])
def test_device_pixels_match_the_cpu_path_within_one_level(mode: str) -> None:
    files = [image_bytes(size, seed=i) for i, size in enumerate(SIZES)]
    files.append(files[0])  # two images of one size are resized together
    batch = decode_on_device(list(files), preprocess_spec(mode), max_image_pixels=LIMIT, device=CPU)
    assert batch.on_device.all()
    assert batch.error_type == [""] * len(files)
    assert batch.pixels.shape == (len(files), 3, 224, 224)
    for i, data in enumerate(files):
        got = batch.pixels[i].permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(got - _cpu_path(data, mode).astype(int))
        assert diff.max() <= 1, (i, mode)
        assert diff.mean() < 0.5
        width, height = SIZES[i % len(SIZES)]
        assert (batch.original_width[i], batch.original_height[i]) == (width, height)
        assert batch.format[i] == "JPEG"


def test_what_the_device_decoder_should_not_see_takes_the_cpu_path() -> None:
    spec = preprocess_spec("center-crop")
    files = corpus_files()
    names = sorted(files)
    contents: list[bytes | BaseException] = [files[n][0] for n in names]
    contents.append(b"")
    contents.append(FileNotFoundError("gone"))
    batch = decode_on_device(contents, spec, max_image_pixels=LIMIT, device=CPU)
    by_name = dict(zip([*names, "empty", "missing"], range(len(contents)), strict=True))
    # Plain RGB and grayscale JPEGs go to the device decoder; the rest, to Pillow.
    assert batch.on_device[by_name["rgb.jpg"]]
    assert batch.on_device[by_name["UPPER CASE é.JPG"]]
    for name in ("rotated.jpg", "cmyk.jpg", "sub/dir/plain.png", "photo.webp", "bad.jpg"):
        assert not batch.on_device[by_name[name]], name
    for name in names:
        data, upright, _ = files[name]
        i = by_name[name]
        try:
            want = decode_image(data, spec, max_image_pixels=LIMIT)
        except ImageRejectedError as rejected:  # the CPU path's own error row
            assert batch.error_type[i] == rejected.error_type, name
            assert not batch.pixels[i].any()
            continue
        assert batch.error_type[i] == "", name
        # Upright sizes, EXIF rotation included, as the CPU path records them.
        assert (batch.original_width[i], batch.original_height[i]) == upright, name
        assert batch.format[i] == want.format
        got = batch.pixels[i].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(got - want.pixels.astype(int)).max() <= 1, name
    assert batch.error_type[by_name["empty"]] == "empty"
    assert batch.error_type[by_name["missing"]] == "unreadable"
    assert "gone" in batch.error_message[by_name["missing"]]


def test_a_jpeg_the_decoder_refuses_fails_alone_with_the_cpu_paths_error() -> None:
    good = image_bytes((64, 48), seed=1)
    # A valid header and a cut scan: the header check passes, the decoder refuses it.
    cut = image_bytes((300, 200), seed=2)
    cut = cut[: len(cut) // 2]
    assert device_decodable(cut, LIMIT, preprocess_spec("center-crop"))
    batch = decode_on_device(
        [good, cut, good], preprocess_spec("center-crop"), max_image_pixels=LIMIT, device=CPU
    )
    assert batch.error_type == ["", "truncated", ""]
    assert batch.on_device.tolist() == [True, False, True]
    assert not batch.pixels[1].any()
    assert batch.pixels[0].any() and torch.equal(batch.pixels[0], batch.pixels[2])


def test_images_over_the_pixel_limit_are_refused_before_any_decode() -> None:
    spec = preprocess_spec("center-crop")
    big, strip = image_bytes((200, 150), seed=1), image_bytes((4000, 2), seed=2)
    assert not device_decodable(big, 200 * 150 - 1, spec)
    batch = decode_on_device([big, strip], spec, max_image_pixels=200 * 150 - 1, device=CPU)
    assert batch.error_type == ["decompression_bomb", "extreme_aspect_ratio"]
    assert not batch.on_device.any()


def test_multi_picture_and_progressive_files() -> None:
    spec = preprocess_spec("center-crop")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8))
    progressive = io.BytesIO()
    image.save(progressive, "JPEG", progressive=True)
    multi = io.BytesIO()
    image.save(multi, "MPO", save_all=True, append_images=[image])
    assert device_decodable(progressive.getvalue(), LIMIT, spec)
    assert not device_decodable(multi.getvalue(), LIMIT, spec)
    batch = decode_on_device(
        [progressive.getvalue(), multi.getvalue()], spec, max_image_pixels=LIMIT, device=CPU
    )
    assert batch.error_type == ["", ""]
    assert batch.format == ["JPEG", "MPO"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_embeddings_within_one_percent_of_the_cpu_path() -> None:
    spec = preprocess_spec("center-crop")
    files = [image_bytes(size, seed=i) for i, size in enumerate(SIZES)]
    cuda = torch.device("cuda")
    batch = decode_on_device(list(files), spec, max_image_pixels=LIMIT, device=cuda)
    assert batch.on_device.all() and batch.pixels.device.type == "cuda"
    weights = load_weights("random", seed=0)
    model = ResNet50Embedder(
        state_dict=weights.state_dict, mean=spec.mean, std=spec.std, device="cuda"
    )
    got = model.embed_on_device(batch.pixels)
    want = model.embed(np.stack([_cpu_path(d) for d in files]))
    relative = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert relative.max() < 0.01


@pytest.mark.gpu
@needs_cuda
def test_the_pinned_host_buffer_is_allocated_once() -> None:
    spec = preprocess_spec("center-crop")
    weights = load_weights("random", seed=0)
    model = ResNet50Embedder(
        state_dict=weights.state_dict, mean=spec.mean, std=spec.std, device="cuda", batch_hint=8
    )
    pixels = np.random.default_rng(0).integers(0, 255, (8, 224, 224, 3), dtype=np.uint8)
    first = model.embed(pixels)
    pinned = model._local.pinned
    assert pinned.is_pinned()
    model.embed(pixels[:5])
    again = model.embed(pixels)
    assert model._local.pinned.data_ptr() == pinned.data_ptr()
    np.testing.assert_allclose(again, first, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 6, 8])
def test_the_marker_walk_reads_exif_orientation(orientation: int | None) -> None:
    data = image_bytes((60, 40), seed=3, orientation=orientation)
    assert device_decodable(data, LIMIT, preprocess_spec("center-crop")) == (
        orientation in (None, 1)
    )


def test_an_xmp_orientation_takes_the_cpu_path_and_is_applied() -> None:
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes((60, 40), seed=4))).save(buffer, "JPEG", xmp=xmp)
    spec = preprocess_spec("center-crop")
    batch = decode_on_device([buffer.getvalue()], spec, max_image_pixels=LIMIT, device=CPU)
    assert not batch.on_device[0]
    assert (batch.original_width[0], batch.original_height[0]) == (40, 60)  # upright


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for nodes without CUDA")
def test_a_model_actor_without_cuda_refuses_to_decode_on_device() -> None:
    from pipeline.config import ConfigError

    spec = preprocess_spec("center-crop")
    with pytest.raises(ConfigError, match="^--decode-device cuda needs a CUDA device"):
        ResNet50Embedder(
            state_dict=load_weights("random", seed=0).state_dict,
            mean=spec.mean,
            std=spec.std,
            decode_spec=spec,
        )


def _cpu_model(**options: object) -> ResNet50Embedder:
    """The model stage on this machine's CPU, seeded random weights."""
    spec = preprocess_spec("center-crop")
    return ResNet50Embedder(
        state_dict=load_weights("random", seed=0).state_dict,
        mean=spec.mean,
        std=spec.std,
        device="cpu",
        **options,  # type: ignore[arg-type]
    )


def test_a_compiled_model_sees_one_batch_shape() -> None:
    """Short batches are padded to the usual size (and cut back), so nothing recompiles."""
    model = _cpu_model(batch_hint=4)
    pixels = np.random.default_rng(0).integers(0, 255, (4, 224, 224, 3), dtype=np.uint8)
    eager = model.embed(pixels[:3])
    shapes: list[tuple[int, ...]] = []
    forward = model.model

    def recording(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return forward(x)

    model.model, model.compiled = recording, True  # as torch.compile(model) would be called
    padded = model.embed(pixels[:3])
    assert shapes == [(4, 3, 224, 224)]
    assert padded.shape == (3, 2048)
    np.testing.assert_allclose(padded, eager, rtol=1e-4, atol=1e-4)


def test_a_compiled_model_compiles_on_one_thread_then_runs_on_all() -> None:
    """With concurrent calls, the first call (torch.compile's compile) runs alone; later
    calls run at once."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    model = _cpu_model(batch_hint=2, concurrent_calls=2)
    running, most = 0, []
    lock = threading.Lock()

    def recording(x: torch.Tensor) -> torch.Tensor:
        nonlocal running
        with lock:
            running += 1
            most.append(running)
        time.sleep(0.3)
        with lock:
            running -= 1
        return x.new_zeros((x.shape[0], 2048))

    # As torch.compile(model) would be called, before its first call.
    model.model, model.compiled, model._warm = recording, True, False
    pixels = torch.zeros((2, 3, 224, 224), dtype=torch.uint8)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(model.features_on_device, [pixels, pixels]))
        assert max(most) == 1  # the first call ran alone, and the one waiting after it
        most.clear()
        list(pool.map(model.features_on_device, [pixels, pixels]))
        assert max(most) == 2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_the_gpu_model_stage_decodes_fetched_bytes_like_the_cpu_path(
    tmp_path, compile: bool
) -> None:  # type: ignore[no-untyped-def]
    """The actor's stage code on a GPU, without Ray: ``fetch_batch`` -> the model actor with
    ``decode_spec`` gives the columns of ``decode_batch`` -> the model, compiled or not."""
    from pipeline.decode import decode_batch, fetch_batch

    names = sorted(corpus_files())
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(corpus_files()[name][0])
    paths = [str(tmp_path / n) for n in names] + [str(tmp_path / "gone.jpg")]
    listing = {
        "uri": np.asarray(paths, dtype=object),
        "path": np.asarray(paths, dtype=object),
        "file_size": np.zeros(len(paths), dtype=np.int64),
        "source_version": np.asarray([""] * len(paths), dtype=object),
    }
    spec = preprocess_spec("center-crop")
    weights = load_weights("random", seed=0)
    common = {"state_dict": weights.state_dict, "mean": spec.mean, "std": spec.std}
    on_gpu = ResNet50Embedder(
        **common,
        precision="bf16",
        decode_spec=spec,
        max_image_pixels=LIMIT,
        compile=compile,
        batch_hint=16,
    )
    got = on_gpu(fetch_batch(listing, storage_options={}))
    want = ResNet50Embedder(**common, device="cpu")(
        decode_batch(listing, spec=spec, storage_options={}, max_image_pixels=LIMIT)
    )
    assert set(got) == set(want)
    for column in ("uri", "original_width", "original_height", "format", "error_type"):
        assert list(got[column]) == list(want[column]), column
    ok = want["error_type"] == ""
    assert ok.sum() == 10 and not got["embedding"][~ok].any()
    relative = np.linalg.norm(got["embedding"][ok] - want["embedding"][ok], axis=1)
    assert (relative / np.linalg.norm(want["embedding"][ok], axis=1)).max() < 0.02


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize(
    "device, compile",
    [
        ("cpu", False),
        pytest.param("cuda", False, marks=[pytest.mark.gpu, needs_cuda]),
        pytest.param("cuda", True, marks=[pytest.mark.gpu, needs_cuda]),
    ],
)
def test_concurrent_calls_on_their_own_streams_give_what_calls_in_turn_give(
    tmp_path, decode: bool, device: str, compile: bool
) -> None:  # type: ignore[no-untyped-def]
    """``--calls-per-actor 2``: two threads call one model stage at once, each with its own
    pinned buffer and CUDA stream (on a GPU); every batch's embeddings equal those of calls in
    turn. On CPU, the device decode path is torchvision's CPU decoder."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.decode import fetch_batch

    spec = preprocess_spec("center-crop")
    weights = load_weights("random", seed=0)
    common = {"state_dict": weights.state_dict, "mean": spec.mean, "std": spec.std}
    if decode:
        common |= {"decode_spec": spec, "max_image_pixels": LIMIT}
    rng = np.random.default_rng(0)
    batches = []
    for b in range(8):
        if decode:
            paths = []
            for i in range(6):
                path = tmp_path / f"b{b}-{i}.jpg"
                path.write_bytes(image_bytes(SIZES[(b + i) % len(SIZES)], seed=10 * b + i))
                paths.append(str(path))
            listing = {
                "uri": np.asarray(paths, dtype=object),
                "path": np.asarray(paths, dtype=object),
                "file_size": np.zeros(len(paths), dtype=np.int64),
                "source_version": np.asarray([""] * len(paths), dtype=object),
            }
            batches.append(fetch_batch(listing, storage_options={}))
        else:
            batches.append(
                {
                    "uri": np.asarray([f"b{b}-{i}" for i in range(6)], dtype=object),
                    "error_type": np.asarray([""] * 6, dtype=object),
                    "image": rng.integers(0, 255, (6, 224, 224, 3), dtype=np.uint8),
                }
            )
    in_turn = ResNet50Embedder(**common, device=device, batch_hint=6)
    want = [in_turn(batch)["embedding"] for batch in batches]
    at_once = ResNet50Embedder(
        **common, device=device, batch_hint=6, concurrent_calls=2, compile=compile
    )
    with ThreadPoolExecutor(2) as pool:
        got = [out["embedding"] for out in pool.map(at_once, batches)]
    for g, w in zip(got, want, strict=True):
        # cuDNN may pick other kernels at another moment; another batch's rows are far off.
        relative = np.linalg.norm(g - w, axis=1) / np.linalg.norm(w, axis=1)
        assert relative.max() < 0.01, relative
