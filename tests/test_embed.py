"""The model stage: per image, our embedding equals a plain torchvision computation."""

from __future__ import annotations

import ctypes
import io
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline import embed as embed_module
from pipeline.config import ConfigError
from pipeline.decode import decode_image
from pipeline.embed import CPU_ACTOR_ENV, ResNet50Embedder
from pipeline.plan import model_remote_args
from pipeline.preprocessing import preprocess_spec
from pipeline.weights import load_weights

LIMIT = 89_478_485


@pytest.fixture(scope="module")
def weights():  # type: ignore[no-untyped-def]
    return load_weights("random", seed=0)


@pytest.fixture(scope="module")
def reference_model(weights):  # type: ignore[no-untyped-def]
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.load_state_dict(weights.state_dict)
    model.fc = torch.nn.Identity()
    return model.eval()


def reference_transform(mode: str):  # type: ignore[no-untyped-def]
    """Plain torchvision, written independently of pipeline.preprocessing."""
    from torchvision import transforms as T  # noqa: N812
    from torchvision.models import ResNet50_Weights
    from torchvision.transforms.v2 import functional as tf2

    weights_transform = ResNet50_Weights.IMAGENET1K_V2.transforms()
    normalize = T.Compose(
        [
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float),
            T.Normalize(weights_transform.mean, weights_transform.std),
        ]
    )
    if mode == "center-crop":
        return weights_transform
    if mode == "squash":
        return T.Compose(
            [
                T.Resize((224, 224), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                normalize,
            ]
        )

    def letterbox(image: Image.Image) -> torch.Tensor:
        fitted = tf2.resize(image, size=None, max_size=224, antialias=True)
        canvas = Image.new("RGB", (224, 224), tuple(round(255 * m) for m in weights_transform.mean))
        canvas.paste(fitted, ((224 - fitted.width) // 2, (224 - fitted.height) // 2))
        return normalize(canvas)

    return letterbox


def _upright_rgb(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


@pytest.mark.parametrize("mode", ["center-crop", "squash", "letterbox"])
def test_embedding_equals_torchvision(mode, weights, reference_model, make_image) -> None:  # type: ignore[no-untyped-def]
    images = [
        make_image((64, 48), seed=1),
        make_image((60, 40), seed=2, orientation=6),
        make_image((300, 90), seed=3, fmt="PNG"),
        make_image((17, 70), seed=4, fmt="WEBP"),
    ]
    spec = preprocess_spec(mode)  # type: ignore[arg-type]
    pixels = np.stack([decode_image(d, spec, max_image_pixels=LIMIT).pixels for d in images])
    embedder = ResNet50Embedder(state_dict=weights.state_dict, mean=spec.mean, std=spec.std)
    ours = embedder.embed(pixels)
    transform = reference_transform(mode)
    with torch.inference_mode():
        theirs = reference_model(torch.stack([transform(_upright_rgb(d)) for d in images])).numpy()
    assert ours.shape == (4, 2048) and ours.dtype == np.float32
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * scale)
    # Distinct images, distinct vectors: the comparison above is not between constants.
    assert np.abs(ours[0] - ours[1]).max() > 1e-3 * scale


def test_normalize_gives_unit_vectors_and_failed_rows_stay_zero(weights, make_image) -> None:  # type: ignore[no-untyped-def]
    spec = preprocess_spec("center-crop")
    good = decode_image(make_image((50, 50)), spec, max_image_pixels=LIMIT).pixels
    batch = {
        "uri": np.array(["a", "b"], dtype=object),
        "image": np.stack([good, np.zeros_like(good)]),
        "error_type": np.array(["", "not_an_image"], dtype=object),
    }
    embedder = ResNet50Embedder(
        state_dict=weights.state_dict, mean=spec.mean, std=spec.std, normalize=True
    )
    out = embedder(batch)
    assert "image" not in out
    assert np.isclose(np.linalg.norm(out["embedding"][0]), 1.0, atol=1e-5)
    assert not out["embedding"][1].any()
    assert set(out) == {"uri", "error_type", "embedding"}  # no per-row precision: files hold it


def test_fp16_on_cpu_is_refused_not_downgraded(weights) -> None:  # type: ignore[no-untyped-def]
    # The driver records the precision in the output; an actor computing another would lie.
    spec = preprocess_spec("center-crop")
    with pytest.raises(ConfigError, match="--precision fp16 needs a CUDA device"):
        ResNet50Embedder(
            state_dict=weights.state_dict,
            mean=spec.mean,
            std=spec.std,
            precision="fp16",
            device="cpu",
        )


def test_bf16_on_a_cpu_without_native_bf16_is_refused_in_one_line(weights, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spec = preprocess_spec("center-crop")
    monkeypatch.setattr(embed_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="^--precision bf16 on CPU needs AVX512-BF16 or AMX"):
        ResNet50Embedder(
            state_dict=weights.state_dict,
            mean=spec.mean,
            std=spec.std,
            precision="bf16",
            device="cpu",
        )


@pytest.mark.skipif(not embed_module.cpu_has_bf16(), reason="needs AVX512-BF16 or AMX")
def test_bf16_on_a_cpu_with_native_bf16_computes_in_bf16(weights, make_image) -> None:  # type: ignore[no-untyped-def]
    spec = preprocess_spec("center-crop")
    pixels = np.stack(
        [
            decode_image(make_image((80, 60), seed=s), spec, max_image_pixels=LIMIT).pixels
            for s in range(4)
        ]
    )
    common = {"state_dict": weights.state_dict, "mean": spec.mean, "std": spec.std}
    fp32 = ResNet50Embedder(**common, device="cpu").embed(pixels)
    bf16_model = ResNet50Embedder(**common, precision="bf16", device="cpu")
    seen = []
    bf16_model.model.layer4.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    bf16 = bf16_model.embed(pixels)
    assert seen == [torch.bfloat16]  # autocast did run the convolutions in bf16
    relative = np.linalg.norm(bf16 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    assert 0 < relative.max() < 0.02


def test_a_cpu_model_keeps_its_freed_buffers(weights, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A CPU embedder sets glibc's mmap threshold and never trims, so forward passes reuse
    their activations' pages (bench/RESULTS.md has what that is worth)."""
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: ctypes.c_int) -> int:
            calls.append((param, value.value))
            return 1

    monkeypatch.setattr(embed_module.ctypes, "CDLL", lambda name: FakeLibc())
    spec = preprocess_spec("center-crop")
    ResNet50Embedder(state_dict=weights.state_dict, mean=spec.mean, std=spec.std, device="cpu")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    assert calls == [(m_mmap_threshold, 1 << 30), (m_trim_threshold, 2**31 - 1)]


def test_a_cpu_model_actor_runs_with_one_malloc_arena(ray_session, weights) -> None:  # type: ignore[no-untyped-def]
    """Under Ray Data, as in the pipeline, the model runs off the main thread, so its process
    must start with one malloc arena: another thread's arena mmaps each large block afresh."""
    import ray

    class _ArenaProbe(ResNet50Embedder):
        """The model stage's class, reporting where and how its calls run."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {
                "arena_max": np.array([os.environ.get("MALLOC_ARENA_MAX", "")]),
                "main_thread": np.array([threading.current_thread() is threading.main_thread()]),
            }

    spec = preprocess_spec("center-crop")
    (row,) = (
        ray.data.range(1)
        .map_batches(
            _ArenaProbe,
            batch_size=1,
            fn_constructor_kwargs={
                "state_dict": weights.as_numpy(),
                "mean": spec.mean,
                "std": spec.std,
            },
            compute=ray.data.ActorPoolStrategy(size=1),
            **model_remote_args(0),
        )
        .take_all()
    )
    assert not row["main_thread"]  # the case the arena setting is for
    assert row["arena_max"] == CPU_ACTOR_ENV["MALLOC_ARENA_MAX"] == "1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_matches_cpu(precision, weights, make_image) -> None:  # type: ignore[no-untyped-def]
    spec = preprocess_spec("center-crop")
    pixels = np.stack(
        [
            decode_image(make_image((80, 60), seed=s), spec, max_image_pixels=LIMIT).pixels
            for s in range(4)
        ]
    )
    cpu = ResNet50Embedder(
        state_dict=weights.state_dict, mean=spec.mean, std=spec.std, device="cpu"
    ).embed(pixels)
    gpu = ResNet50Embedder(
        state_dict=weights.state_dict,
        mean=spec.mean,
        std=spec.std,
        precision=precision,
        device="cuda",
    ).embed(pixels)
    tolerance = 1e-3 if precision == "fp32" else 5e-2
    relative = np.linalg.norm(gpu - cpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert relative.max() < tolerance
