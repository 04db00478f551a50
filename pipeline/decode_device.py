"""Stage 2 on the model's device (``--decode-device cuda``): JPEG bytes -> model input, nvJPEG.

Compressed bytes travel to the model actor, about a tenth of the decoded pixels' bytes. There,
each header's markers are walked on the CPU (no pixel decoded), the plain JPEGs of a batch
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
import warnings
from typing import TYPE_CHECKING

import numpy as np

from pipeline.decode import ImageRejectedError, decode_content
from pipeline.preprocessing import PreprocessSpec, resized_size

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


# Start-of-frame markers the device decoder takes: baseline, extended sequential, progressive
# (Huffman-coded). Arithmetic-coded, lossless and hierarchical frames go to Pillow.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_ALL_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_ORIENTATION = 0x0112


def device_decodable(data: bytes, max_image_pixels: int, spec: PreprocessSpec) -> bool:
    """Whether the device decoder may take this file: a plain JPEG, upright, within the limits.

    Walks the JPEG markers up to the frame header (a few microseconds; Pillow's ``open`` and
    ``getexif`` took about 45 per image on the GPU bench's CPU). Anything it does not know to
    be plain goes to the CPU path, which also gives broken files their error rows: more than
    one picture (MPF), CMYK/YCCK or RGB-coded colour, 12-bit or arithmetic-coded frames, an
    EXIF or XMP orientation, images over the pixel limits.
    """
    if data[:2] != b"\xff\xd8":
        return False
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return False
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1:
            if segment.startswith(b"Exif\x00\x00"):
                if _exif_orientation(segment[6:]) != 1:
                    return False
            elif b"Orientation" in segment:  # XMP's tiff:Orientation, which Pillow honours
                return False
        elif marker == 0xE2 and segment.startswith(b"MPF\x00"):
            return False  # a multi-picture file (MPO)
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) > 11:
            if segment[11] == 0 and _components(data, pos) != 1:
                return False  # Adobe transform 0: RGB or CMYK samples, not YCbCr
        elif marker in _ALL_FRAMES:
            if marker not in _DEVICE_FRAMES or len(segment) < 6 or segment[0] != 8:
                return False
            height = int.from_bytes(segment[1:3], "big")
            width = int.from_bytes(segment[3:5], "big")
            components = segment[5]
            if components not in (1, 3) or width < 1 or height < 1:
                return False
            if components == 3 and segment[6:7] + segment[9:10] + segment[12:13] == b"RGB":
                return False  # component ids R, G, B: libjpeg reads RGB samples
            if width * height > max_image_pixels:
                return False
            new_w, new_h = resized_size(width, height, spec)
            return new_w * new_h <= max_image_pixels
        elif marker == 0xDA:  # scan before any frame header
            return False
        pos += 2 + length
    return False


def _components(data: bytes, pos: int) -> int:
    """The frame header's component count, for a segment seen before it (0 if none)."""
    end = len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _ALL_FRAMES:
            return data[pos + 9] if pos + 9 < end else 0
        if marker == 0xDA or length < 2:
            return 0
        pos += 2 + length
    return 0


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag of an EXIF block's first IFD: 1 if absent, 0 if unreadable."""
    if tiff[:2] == b"II":
        order = "little"
    elif tiff[:2] == b"MM":
        order = "big"
    else:
        return 0
    offset = int.from_bytes(tiff[4:8], order)  # type: ignore[arg-type]
    if offset + 2 > len(tiff):
        return 0
    count = int.from_bytes(tiff[offset : offset + 2], order)  # type: ignore[arg-type]
    for k in range(count):
        entry = tiff[offset + 2 + 12 * k : offset + 14 + 12 * k]
        if len(entry) < 12:
            return 0
        if int.from_bytes(entry[:2], order) == _ORIENTATION:  # type: ignore[arg-type]
            return int.from_bytes(entry[8:10], order)  # type: ignore[arg-type]
    return 1


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
    antialiased bilinear (or bicubic) interpolation, which follows Pillow's filter.
    """
    import torch

    return torch.stack(_resized_rows(images, spec))


def _resized_rows(images: list[torch.Tensor], spec: PreprocessSpec) -> list[torch.Tensor]:
    """Each image resized, as a ``(3, crop, crop)`` view; images of one size go together.

    Nothing here copies from the host or waits for the device (no index tensors, no
    ``torch.tensor`` of Python values), so the host can prepare the next batch while the
    device still runs the last one.
    """
    import torch

    size = spec.crop_size
    rows: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(i)
    for (height, width), members in groups.items():
        stacked = torch.stack([images[i] for i in members])
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
        if spec.mode == "center-crop":
            top = int(round((new_h - size) / 2.0))
            left = int(round((new_w - size) / 2.0))
            stacked = stacked[:, :, top : top + size, left : left + size]
        elif spec.mode == "letterbox":
            canvas = stacked.new_empty((len(members), 3, size, size))
            for channel, value in enumerate(spec.pad_value):
                canvas[:, channel].fill_(value)
            top, left = (size - new_h) // 2, (size - new_w) // 2
            canvas[:, :, top : top + new_h, left : left + new_w] = stacked
            stacked = canvas
        for k, i in enumerate(members):
            rows[i] = stacked[k]
    return [row for row in rows if row is not None]


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
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    formats = [""] * n
    error_types = [""] * n
    messages = [""] * n
    on_device = np.zeros(n, dtype=bool)
    rows: list[torch.Tensor | None] = [None] * n

    candidates = [
        i
        for i, content in enumerate(contents)
        if isinstance(content, bytes) and device_decodable(content, max_image_pixels, spec)
    ]
    decoded = decode_jpegs([contents[i] for i in candidates], device)  # type: ignore[misc]
    ok = [(i, image) for i, image in zip(candidates, decoded, strict=True) if image is not None]
    if ok:
        resized = _resized_rows([image for _, image in ok], spec)
        for (i, image), row in zip(ok, resized, strict=True):
            rows[i] = row
            heights[i], widths[i] = int(image.shape[1]), int(image.shape[2])
            formats[i] = "JPEG"
            on_device[i] = True

    on_cpu: list[tuple[int, np.ndarray]] = []
    for i, content in enumerate(contents):
        if on_device[i]:
            continue
        try:
            one = decode_content(content, spec, max_image_pixels=max_image_pixels)
        except ImageRejectedError as rejected:
            error_types[i], messages[i] = rejected.error_type, str(rejected)
            continue
        on_cpu.append((i, one.pixels))
        widths[i], heights[i] = one.original_width, one.original_height
        formats[i] = one.format
    if on_cpu:
        host = torch.from_numpy(np.stack([p for _, p in on_cpu])).permute(0, 3, 1, 2)
        for (i, _), row in zip(on_cpu, host.to(device), strict=True):
            rows[i] = row
    size = spec.crop_size
    if any(row is None for row in rows):
        zeros = torch.zeros((3, size, size), dtype=torch.uint8, device=device)
        rows = [zeros if row is None else row for row in rows]
    pixels = (
        torch.stack(rows)  # type: ignore[arg-type]
        if rows
        else torch.zeros((0, 3, size, size), dtype=torch.uint8, device=device)
    )
    return DeviceBatch(pixels, widths, heights, formats, error_types, messages, on_device)
