"""The resize spec, derived from the weights' own torchvision transform, and its application.

Decode tasks call :func:`resize_to_model_input` and ship uint8 pixels; the model stage does the
float conversion and mean/std normalization on its device (4x less data to move than float32).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import ResizeMode

TRANSFORM_SOURCE = "torchvision ResNet50_Weights.IMAGENET1K_V2.transforms()"


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """What turns an upright RGB image into the model's input; written into every output file.

    Example:
        >>> spec = preprocess_spec("center-crop")
        >>> spec.resize_size, spec.crop_size, spec.interpolation
        (232, 224, 'bilinear')
    """

    mode: ResizeMode
    resize_size: int
    crop_size: int
    interpolation: str
    antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_value: tuple[int, int, int]
    jpeg_draft: bool

    def to_metadata(self) -> dict[str, Any]:
        # Where the numbers come from, whatever the weights (random and file weights are
        # ResNet50s for the same input): the transform, not the weights, is named.
        return dataclasses.asdict(self) | {"transform_from": TRANSFORM_SOURCE}


def preprocess_spec(mode: ResizeMode, *, jpeg_draft: bool = False) -> PreprocessSpec:
    """Derive the spec from ``ResNet50_Weights.IMAGENET1K_V2.transforms()``.

    ``center-crop`` is exactly that transform (shorter side to 232, bilinear with antialias,
    center crop 224). ``squash`` and ``letterbox`` keep its 224 output, interpolation and
    normalization. Random and file weights use the same transform: they are ResNet50s trained
    (or initialised) for that input.
    """
    from torchvision.models import ResNet50_Weights

    transform = ResNet50_Weights.IMAGENET1K_V2.transforms()
    crop = int(transform.crop_size[0])
    resize = int(transform.resize_size[0])
    mean = tuple(float(m) for m in transform.mean)
    std = tuple(float(s) for s in transform.std)
    return PreprocessSpec(
        mode=mode,
        resize_size=resize if mode == "center-crop" else crop,
        crop_size=crop,
        interpolation=transform.interpolation.value,
        antialias=bool(transform.antialias),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        # Letterbox pads with the mean colour, which normalizes to zero.
        pad_value=tuple(round(255 * m) for m in mean),  # type: ignore[arg-type]
        jpeg_draft=jpeg_draft,
    )


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_to_model_input(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize an upright RGB image as ``spec`` says.

    Pillow alone, so decode workers never import torch; the sizes and rounding are those of
    torchvision's ``resize`` and ``center_crop`` on PIL images (which call the same
    ``Image.resize``), and the tests hold the two equal pixel for pixel.

    Args:
        image: An RGB Pillow image, EXIF orientation already applied.
        spec: From :func:`preprocess_spec`.

    Returns:
        ``uint8`` array of shape ``(crop_size, crop_size, 3)``.
    """
    resample = _RESAMPLE[spec.interpolation]
    size = spec.crop_size
    width, height = image.size
    if spec.mode == "center-crop":
        new_w, new_h = resized_size(width, height, spec)
        out = image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), resample)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        out = out.crop((left, top, left + size, top + size))
    elif spec.mode == "squash":
        out = image if image.size == (size, size) else image.resize((size, size), resample)
    else:
        new_w, new_h = resized_size(width, height, spec)
        resized = image.resize((new_w, new_h), resample)
        out = Image.new("RGB", (size, size), spec.pad_value)
        out.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(out, dtype=np.uint8)


def resized_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """The ``(width, height)`` an image is resized to before cropping or padding.

    ``center-crop`` follows torchvision's ``_compute_resized_output_size``: the shorter side
    becomes ``resize_size`` and the longer one ``int(resize_size * long / short)``.
    """
    if spec.mode == "squash":
        return spec.crop_size, spec.crop_size
    if spec.mode == "letterbox":
        # torchvision's Resize(size=None, max_size=crop): longer side to crop, shorter side
        # int(crop * short / long), at least one pixel.
        size = spec.crop_size
        if width >= height:
            return size, max(1, int(size * height / width))
        return max(1, int(size * width / height)), size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def draft_request(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """The smallest size libjpeg may scale down to while staying at or above the resize target.

    ``Image.draft`` picks the largest DCT scale whose result is at least the requested size in
    both dimensions, so asking for the size the exact resize would produce keeps every pixel
    of the final image computed from at least as many source pixels.
    """
    if spec.mode == "center-crop":
        scale = spec.resize_size / min(width, height)
    elif spec.mode == "squash":
        return spec.crop_size, spec.crop_size
    else:
        scale = spec.crop_size / max(width, height)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))
