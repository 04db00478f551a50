"""The resize spec comes from torchvision's weights, and our Pillow-only resize equals theirs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.preprocessing import preprocess_spec, resize_to_model_input


def _rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_spec_is_read_from_the_imagenet_weights_transform() -> None:
    from torchvision.models import ResNet50_Weights

    transform = ResNet50_Weights.IMAGENET1K_V2.transforms()
    spec = preprocess_spec("center-crop")
    assert spec.resize_size == transform.resize_size[0] == 232
    assert spec.crop_size == transform.crop_size[0] == 224
    assert spec.interpolation == "bilinear"
    assert spec.mean == tuple(transform.mean) and spec.std == tuple(transform.std)
    assert preprocess_spec("squash").resize_size == 224


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (1, 1), (4000, 20), (300, 232), (500, 375)])
def test_center_crop_equals_torchvision_pixel_for_pixel(size: tuple[int, int]) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tf

    image = _rgb(size)
    ours = resize_to_model_input(image, preprocess_spec("center-crop"))
    theirs = tf.center_crop(
        tf.resize(image, [232], interpolation=InterpolationMode.BILINEAR, antialias=True), [224]
    )
    assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3)
    np.testing.assert_array_equal(ours, np.asarray(theirs))


@pytest.mark.parametrize("size", [(64, 48), (4000, 20), (7, 300)])
def test_squash_equals_torchvision_resize_to_square(size: tuple[int, int]) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tf

    image = _rgb(size, seed=1)
    ours = resize_to_model_input(image, preprocess_spec("squash"))
    theirs = tf.resize(image, [224, 224], interpolation=InterpolationMode.BILINEAR, antialias=True)
    np.testing.assert_array_equal(ours, np.asarray(theirs))


@pytest.mark.parametrize("size", [(64, 48), (30, 90), (500, 375), (4000, 20)])
def test_letterbox_keeps_aspect_and_pads_with_the_mean_colour(size: tuple[int, int]) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tf2

    spec = preprocess_spec("letterbox")
    image = _rgb(size, seed=2)
    ours = resize_to_model_input(image, spec)
    fitted = tf2.resize(
        image, size=None, max_size=224, interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    w, h = fitted.size
    assert max(w, h) == 224
    left, top = (224 - w) // 2, (224 - h) // 2
    np.testing.assert_array_equal(ours[top : top + h, left : left + w], np.asarray(fitted))
    pad = np.ones_like(ours, dtype=bool)
    pad[top : top + h, left : left + w] = False
    assert (ours[pad] == np.tile(spec.pad_value, pad.sum() // 3).reshape(-1)).all() or not pad.any()


def test_draft_request_stays_at_or_above_the_resize_target() -> None:
    from pipeline.preprocessing import draft_request

    spec = preprocess_spec("center-crop", jpeg_draft=True)
    buffer = io.BytesIO()
    _rgb((4032, 3024)).save(buffer, format="JPEG")
    image = Image.open(buffer)
    image.draft("RGB", draft_request(*image.size, spec))
    assert min(image.size) >= 232
    assert image.size[0] < 4032  # libjpeg did scale down
