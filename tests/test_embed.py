"""The model stage: per image, our embedding equals a plain torchvision computation."""

from __future__ import annotations

import io
import resource
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.decode import decode_image
from pipeline.embed import ResNet50Embedder
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
    assert list(out["precision"]) == ["fp32", "fp32"]


def test_half_precision_request_on_cpu_computes_fp32(weights) -> None:  # type: ignore[no-untyped-def]
    spec = preprocess_spec("center-crop")
    embedder = ResNet50Embedder(
        state_dict=weights.state_dict, mean=spec.mean, std=spec.std, precision="bf16", device="cpu"
    )
    assert embedder.precision == "fp32" and embedder.autocast_dtype is None


def test_a_cpu_model_actor_reuses_its_buffers_between_batches(ray_session, weights) -> None:  # type: ignore[no-untyped-def]
    """Under Ray Data, as in the pipeline, a forward pass finds its activations' pages mapped.

    Ray Data calls the model from a worker thread, whose own malloc arena would mmap (and
    fault in) every block over 64 MiB on each batch: about 250,000 faults for 32 images.
    """
    import ray

    class _PageFaultProbe(ResNet50Embedder):
        """The model stage's class, reporting the page faults of its forward passes."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            images = np.random.default_rng(0).integers(0, 255, (32, 224, 224, 3), dtype=np.uint8)
            faults = []
            for _ in range(3):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                self.embed(images)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            return {
                # The first pass maps the buffers; later ones reuse them (an odd one maps a
                # few more). Without one arena, every pass faults some 300,000 pages.
                "faults": np.array([min(faults[1:])]),
                "main_thread": np.array([threading.current_thread() is threading.main_thread()]),
            }

    spec = preprocess_spec("center-crop")
    (row,) = (
        ray.data.range(1)
        .map_batches(
            _PageFaultProbe,
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
    assert row["faults"] < 50_000, row["faults"]


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
