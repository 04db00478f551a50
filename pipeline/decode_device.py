"""Stage 2 on the model's device (``--decode-device cuda``): JPEG bytes -> model input, nvJPEG.

Compressed bytes travel to the model actor, about a tenth of the decoded pixels' bytes. There,
each header is read on the CPU (Pillow parses the markers, no pixel), the plain JPEGs of a batch
are decoded in one ``torchvision.io.decode_jpeg(..., device=...)`` call, and resized and cropped
on the device to the same spec as :func:`pipeline.preprocessing.resize_to_model_input`.

What the device decoder should not see goes through :func:`pipeline.decode.decode_image` on
the CPU, one image at a time, so its pixels, original size and error row are the CPU path's:
non-JPEGs, multi-picture files, CMYK and other JPEGs that are neither YCbCr nor grayscale,
EXIF-rotated images, images over the pixel limit, and any JPEG the device decoder refuses.
On a CPU device the same code runs with libjpeg-turbo (the tests use that).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline.decode import (
    MESSAGE_CHARS,
    UNREADABLE,
    ImageRejectedError,
    decode_image,
)
from pipeline.preprocessing import PreprocessSpec, resized_size
from pipeline.storage import one_line

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class DeviceBatch:
    """A decoded batch: model input on the device, and the columns ``decode_batch`` returns."""

    pixels: torch.Tensor  # uint8 (N, 3, crop, crop) on the device; zeros for failed rows
    original_width: np.ndarray  # int32, upright
    original_height: np.ndarray
    format: list[str]
    error_type: list[str]  # "" where the image decoded
    error_message: list[str]
    on_device: np.ndarray  # bool: decoded by the device decoder (else by the CPU path)


def device_decodable(data: bytes, max_image_pixels: int, spec: PreprocessSpec) -> bool:
    """Whether the device decoder may take this file: a plain JPEG, upright, within the limits.

    Reads the header only. Anything else, broken files included, goes to the CPU path, which
    also gives the failures their error rows.
    """
    if data[:2] != b"\xff\xd8":
        return False
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
        with image:
            width, height = image.size
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return False  # MPO, CMYK, YCCK
            if width < 1 or height < 1 or width * height > max_image_pixels:
                return False
            new_w, new_h = resized_size(width, height, spec)
            if new_w * new_h > max_image_pixels:
                return False
            orientation = image.getexif().get(ImageOps.ExifTags.Base.Orientation, 1)
            return orientation == 1
    except Exception:  # noqa: BLE001 - any header the CPU path should judge
        return False


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs to uint8 RGB ``(3, H, W)`` on ``device``; ``None`` where the decoder refuses.

    One batched call first (nvJPEG's batched decode on CUDA); if it fails, as it does for the
    whole batch when one file is refused, each file is tried on its own.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29: use TorchCodec
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for tensor in tensors:
            try:
                out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def resize_on_device(images: list[torch.Tensor], spec: PreprocessSpec) -> torch.Tensor:
    """uint8 ``(3, H, W)`` images -> uint8 ``(N, 3, crop, crop)``, as ``spec`` says.

    The sizes, rounding and crop offsets are those of
    :func:`pipeline.preprocessing.resize_to_model_input`; the resampling is torch's
    antialiased bilinear (or bicubic) interpolation, which follows Pillow's filter. Images of
    one size are resized together.
    """
    import torch

    size = spec.crop_size
    device = images[0].device if images else None
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(i)
    for (height, width), rows in groups.items():
        stacked = torch.stack([images[i] for i in rows])
        new_w, new_h = resized_size(width, height, spec)
        if (new_w, new_h) != (width, height):
            resized = torch.nn.functional.interpolate(
                stacked.float(),
                size=(new_h, new_w),
                mode=spec.interpolation,
                antialias=spec.antialias,
                align_corners=False,
            )
            stacked = resized.round_().clamp_(0, 255).to(torch.uint8)
        index = torch.tensor(rows, device=device)
        if spec.mode == "center-crop":
            top = int(round((new_h - size) / 2.0))
            left = int(round((new_w - size) / 2.0))
            out[index] = stacked[:, :, top : top + size, left : left + size]
        elif spec.mode == "squash":
            out[index] = stacked
        else:
            padded = torch.tensor(spec.pad_value, dtype=torch.uint8, device=device)
            canvas = padded.view(1, 3, 1, 1).expand(len(rows), 3, size, size).clone()
            top, left = (size - new_h) // 2, (size - new_w) // 2
            canvas[:, :, top : top + new_h, left : left + new_w] = stacked
            out[index] = canvas
    return out


def decode_on_device(
    contents: list[bytes | BaseException],
    spec: PreprocessSpec,
    *,
    max_image_pixels: int,
    device: torch.device,
) -> DeviceBatch:
    """Decode a batch's file contents (or read failures) into model input on ``device``.

    Args:
        contents: Each file's bytes, or the exception its read raised (an ``unreadable`` row).
        spec: The resize spec.
        max_image_pixels: Header pixel limit; larger images go to the CPU path, which refuses
            them with its own error row.
        device: Where to decode and where the pixels stay.

    Returns:
        The pixels and per-row columns; rows that failed have zero pixels and an error type.
    """
    import torch

    n = len(contents)
    pixels = torch.zeros((n, 3, spec.crop_size, spec.crop_size), dtype=torch.uint8, device=device)
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    formats = [""] * n
    error_types = [""] * n
    messages = [""] * n
    on_device = np.zeros(n, dtype=bool)

    candidates = [
        i
        for i, content in enumerate(contents)
        if isinstance(content, bytes) and device_decodable(content, max_image_pixels, spec)
    ]
    decoded = decode_jpegs([contents[i] for i in candidates], device)  # type: ignore[misc]
    rows = [i for i, image in zip(candidates, decoded, strict=True) if image is not None]
    images = [image for image in decoded if image is not None]
    if rows:
        pixels[torch.tensor(rows, device=device)] = resize_on_device(images, spec)
        for i, image in zip(rows, images, strict=True):
            heights[i], widths[i] = int(image.shape[1]), int(image.shape[2])
            formats[i] = "JPEG"
        on_device[rows] = True

    on_cpu: list[tuple[int, np.ndarray]] = []
    for i, content in enumerate(contents):
        if on_device[i]:
            continue
        try:
            if isinstance(content, BaseException):
                raise ImageRejectedError(
                    UNREADABLE, f"cannot read: {one_line(content, MESSAGE_CHARS)}"
                )
            one = decode_image(content, spec, max_image_pixels=max_image_pixels)
        except ImageRejectedError as rejected:
            error_types[i], messages[i] = rejected.error_type, str(rejected)
            continue
        on_cpu.append((i, one.pixels))
        widths[i], heights[i] = one.original_width, one.original_height
        formats[i] = one.format
    if on_cpu:
        host = torch.from_numpy(np.stack([p for _, p in on_cpu])).permute(0, 3, 1, 2)
        pixels[torch.tensor([i for i, _ in on_cpu], device=device)] = host.to(device)
    return DeviceBatch(pixels, widths, heights, formats, error_types, messages, on_device)
