"""Stage 2 (CPU tasks): fetch bytes, decode with Pillow, make upright RGB, resize.

A failure is data: each image that cannot be embedded becomes a row with a stable
``error_type``, and its neighbours in the batch are untouched.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.preprocessing import (
    PreprocessSpec,
    draft_request,
    resize_to_model_input,
    resized_size,
)
from pipeline.probe import Probe, probe_rows
from pipeline.reuse import CONTENT_COLUMN, content_digest, take_index
from pipeline.storage import is_local, one_line, open_fs

# Decoders Pillow may use. Anything else (EPS, PSD, ...) is refused before a plugin sees it.
# The JPEG plugin also opens the multi-picture JPEGs many phones write (format "MPO").
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

# Bytes a decode task reads at once (by the listing's file sizes): its memory follows this
# bound, not its row count, so tasks can take many small images and few large ones.
FETCH_BYTES = 64 * 2**20

# Longest ``error_message`` kept in the errors table.
MESSAGE_CHARS = 300

# Stable error classes, the values of the errors table's ``error_type``.
UNREADABLE = "unreadable"
EMPTY = "empty"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
DECOMPRESSION_BOMB = "decompression_bomb"
DECODE_ERROR = "decode_error"
EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"


# Raised by a decode task whose read failed for a passing reason (throttling, 5xx, dropped
# connection) after the store client's own retries: Ray Data retries the task on this text
# (pipeline.plan puts it in ``retried_map_errors``), and a sustained outage fails the run.
TRANSIENT_READ_ERROR = "transient storage error"
# Read failures that are the file's own (gone, forbidden): an ``unreadable`` row each.
LASTING_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


BAD_FILE_NAME = "bad_file_name"


class BadFileNameError(OSError):
    """The file's name is not UTF-8: it was listed percent-encoded, and cannot be opened."""


class TransientReadError(OSError):
    """A read from an object store failed for a passing reason; the task is retried."""


class ImageRejectedError(Exception):
    """One image cannot be embedded; ``error_type`` says why, in a stable word."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 (crop, crop, 3)
    original_width: int  # upright, as a person sees it
    original_height: int
    format: str


def decode_image(data: bytes, spec: PreprocessSpec, *, max_image_pixels: int) -> DecodedImage:
    """Decode one image file's bytes into the model input and its original size.

    Args:
        data: The file's bytes.
        spec: The resize spec.
        max_image_pixels: A header claiming more pixels is refused before decoding.

    Returns:
        The resized uint8 pixels, the upright original size and the decoder's format name.

    Raises:
        ImageRejectedError: with a stable ``error_type``.
    """
    if not data:
        raise ImageRejectedError(EMPTY, "zero-byte file")
    # Truncated files must fail, never decode to grey: the flag is process-global, so assert
    # it rather than trust that no other library has flipped it.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Pillow's own bomb check (a warning above its limit, an error above twice it) follows
    # the configured limit while this image decodes.
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_image_pixels
    try:
        return _decode(data, spec, max_image_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _decode(data: bytes, spec: PreprocessSpec, max_image_pixels: int) -> DecodedImage:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageRejectedError(
                NOT_AN_IMAGE, "not a JPEG, PNG, WebP, BMP, TIFF or GIF"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejectedError(DECOMPRESSION_BOMB, one_line(exc, MESSAGE_CHARS)) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise _rejected(exc) from None
        with image:
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageRejectedError(
                    DECODE_ERROR, f"header gives an empty size {width}x{height}"
                )
            # The header is checked before any pixel is decoded.
            if width * height > max_image_pixels:
                raise ImageRejectedError(
                    DECOMPRESSION_BOMB,
                    f"{width}x{height} is over the {max_image_pixels}-pixel limit",
                )
            resized_w, resized_h = resized_size(width, height, spec)
            if resized_w * resized_h > max_image_pixels:
                # A 1 x 80M-pixel strip passes the header check, but its shorter side scaled
                # to 232 would need gigabytes.
                raise ImageRejectedError(
                    EXTREME_ASPECT_RATIO,
                    f"{width}x{height} would resize to {resized_w}x{resized_h}",
                )
            fmt = str(image.format)
            try:
                if spec.jpeg_draft and fmt in ("JPEG", "MPO"):
                    image.draft("RGB", draft_request(width, height, spec))
                image.load()
                upright = ImageOps.exif_transpose(image)
                # Original size as a person sees it: stored size, EXIF orientation applied.
                if _orientation_swaps_axes(image):
                    original_width, original_height = height, width
                else:
                    original_width, original_height = width, height
                pixels = resize_to_model_input(to_rgb(upright), spec)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageRejectedError(DECOMPRESSION_BOMB, one_line(exc, MESSAGE_CHARS)) from None
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise _rejected(exc) from None
    return DecodedImage(pixels, original_width, original_height, fmt)


def decode_content(
    content: bytes | BaseException, spec: PreprocessSpec, *, max_image_pixels: int
) -> DecodedImage:
    """:func:`decode_image` on a file's bytes, or its failed read as an ``unreadable`` row."""
    failure = _read_failure(content)
    if failure is not None:
        raise failure
    assert isinstance(content, bytes)
    return decode_image(content, spec, max_image_pixels=max_image_pixels)


def unreadable_message(exc: BaseException) -> str:
    return f"cannot read: {one_line(exc, MESSAGE_CHARS)}"


def _orientation_swaps_axes(image: Image.Image) -> bool:
    # Orientations 5-8 rotate by 90 or 270 degrees.
    return image.getexif().get(ImageOps.ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB.

    16-bit samples are scaled (``v / 257``), not clipped; transparency is composited on white;
    CMYK, palette, grayscale and the rest go through Pillow's conversions.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (Pillow opens some 16-bit PNGs as 32-bit "I"): scale 0..65535 to
        # 0..255 rather than let convert() clip everything above 255 to white.
        wide = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in image.info)
        or (mode in ("L", "RGB") and "transparency" in image.info)
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _rejected(exc: BaseException) -> ImageRejectedError:
    """Classify a Pillow failure: data ending early is ``truncated``, the rest ``decode_error``."""
    message = one_line(exc, MESSAGE_CHARS)
    lowered = message.lower()
    if "truncated" in lowered or "broken data stream" in lowered or isinstance(exc, EOFError):
        return ImageRejectedError(TRUNCATED, message)
    return ImageRejectedError(DECODE_ERROR, message)


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    spec: PreprocessSpec,
    storage_options: Mapping[str, Any],
    max_image_pixels: int,
    reuse: Any = None,
    probes: Sequence[Probe] = (),
) -> dict[str, np.ndarray]:
    """Fetch and decode a batch of listed images (a Ray Data ``map_batches`` function).

    Args:
        batch: Listing columns ``uri``, ``path``, ``file_size``, ``source_version``.
        spec: The resize spec.
        storage_options: fsspec options for the input store.
        max_image_pixels: Header pixel limit.
        reuse: The table's :class:`~pipeline.reuse.ContentIndex` (or its object ref):
            images it holds are found (by ETag before the read, else by sha256) and not
            decoded. ``None``: decode every image.
        probes: Stored rows the run re-embeds (:mod:`pipeline.probe`): never reused.

    Returns:
        The listing columns plus ``image`` (uint8, N x crop x crop x 3; zeros for failed and
        reused rows), ``original_width``, ``original_height``, ``format``, ``error_type`` and
        ``error_message`` (empty strings where the image decoded), ``content_sha256`` (the
        bytes' sha256; empty where unread) and ``reuse`` (the index row of a reused image,
        else -1).

    Example:
        >>> out = decode_batch(listing, spec=preprocess_spec("center-crop"),
        ...                    storage_options={}, max_image_pixels=10**8)  # doctest: +SKIP
    """
    uris = [str(u) for u in batch["uri"]]
    paths = [str(p) for p in batch["path"]]
    n = len(uris)
    size = spec.crop_size
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    formats = [""] * n
    error_types = [""] * n
    messages = [""] * n
    found = Found(batch, reuse, probes)
    for rows, contents in found.read(uris, paths, storage_options):
        for i, content in zip(rows, contents, strict=True):
            if found.at[i] >= 0:
                continue  # its bytes are embedded in the table already
            try:
                decoded = decode_content(content, spec, max_image_pixels=max_image_pixels)
            except ImageRejectedError as rejected:
                error_types[i] = rejected.error_type
                messages[i] = str(rejected)
                continue
            images[i] = decoded.pixels
            widths[i] = decoded.original_width
            heights[i] = decoded.original_height
            formats[i] = decoded.format
        del contents
    return {
        "uri": np.asarray(uris, dtype=object),
        "file_size": np.asarray(batch["file_size"], dtype=np.int64),
        "source_version": np.asarray([str(v) for v in batch["source_version"]], dtype=object),
        "image": images,
        "original_width": widths,
        "original_height": heights,
        "format": np.asarray(formats, dtype=object),
        "error_type": np.asarray(error_types, dtype=object),
        "error_message": np.asarray(messages, dtype=object),
        **found.columns(),
    }


class Found:
    """A batch's reads, and which of its images the table holds already (by content).

    Images whose single-part ETag the table holds are found before any read and not read;
    the rest are read ``FETCH_BYTES`` at a time (by the listing's sizes, so a task's memory
    follows that bound, not its row count), hashed, and looked up by their sha256. The
    probe's rows are read and decoded whatever the table holds.
    """

    def __init__(
        self, batch: dict[str, np.ndarray], reuse: Any, probes: Sequence[Probe] = ()
    ) -> None:
        self.index = take_index(reuse)
        self.sizes = [int(s) for s in batch["file_size"]]
        n = len(self.sizes)
        self.digests = [b""] * n
        self.probe = probe_rows(batch, probes) if probes else np.zeros(n, dtype=bool)
        self.at = (
            self.index.find_etags(batch["source_version"], self.sizes)
            if self.index is not None
            else np.full(n, -1, np.int64)
        )
        self.at[self.probe] = -1

    def read(
        self, uris: list[str], paths: list[str], storage_options: Mapping[str, Any]
    ) -> Iterator[tuple[list[int], list[bytes | BaseException]]]:
        """The rows not found by ETag, a group at a time, with their bytes or read failures."""
        unread = [i for i in range(len(uris)) if self.at[i] < 0]
        for group in byte_groups([self.sizes[i] for i in unread], FETCH_BYTES):
            rows = unread[group]
            contents = _fetch([uris[i] for i in rows], [paths[i] for i in rows], storage_options)
            for i, content in zip(rows, contents, strict=True):
                if isinstance(content, bytes):
                    self.digests[i] = content_digest(content)
            if self.index is not None:
                self.at[rows] = self.index.find([self.digests[i] for i in rows])
                self.at[self.probe] = -1
            yield rows, contents

    def columns(self) -> dict[str, np.ndarray]:
        return {
            CONTENT_COLUMN: np.asarray(self.digests, dtype=object),
            "reuse": self.at,
        }


def byte_groups(sizes: list[int], limit: int) -> list[slice]:
    """Consecutive groups of rows whose sizes add up to at most ``limit`` (one row at least).

    Example:
        >>> byte_groups([5, 5, 5, 20, 1], 10)
        [slice(0, 2, None), slice(2, 3, None), slice(3, 4, None), slice(4, 5, None)]
    """
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            groups.append(slice(start, i))
            start, total = i, 0
        total += size
    if sizes:
        groups.append(slice(start, len(sizes)))
    return groups


def fetch_batch(
    batch: dict[str, np.ndarray],
    *,
    storage_options: Mapping[str, Any],
    reuse: Any = None,
    probes: Sequence[Probe] = (),
) -> dict[str, np.ndarray]:
    """Fetch a batch of listed images' bytes, undecoded (``--decode-device cuda``).

    The model actor decodes them (:mod:`pipeline.decode_device`); compressed bytes are about a
    tenth of the pixels that CPU decode would send it. A file that cannot be read is an
    ``unreadable`` row here, as in :func:`decode_batch`, and a passing store failure raises
    for Ray Data to retry the task. Images the table holds already are found as there
    (``reuse``), and their bytes are not sent.

    Returns:
        ``uri``, ``file_size``, ``source_version``, ``data`` (bytes; empty where unreadable or
        reused), ``error_type``, ``error_message``, ``content_sha256`` and ``reuse``.
    """
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    data = [b""] * n
    error_types, messages = [""] * n, [""] * n
    found = Found(batch, reuse, probes)
    for rows, contents in found.read(uris, [str(p) for p in batch["path"]], storage_options):
        for i, content in zip(rows, contents, strict=True):
            rejected = _read_failure(content)
            if rejected is not None:
                error_types[i], messages[i] = rejected.error_type, str(rejected)
            elif found.at[i] < 0:
                data[i] = content  # type: ignore[assignment]
    return {
        "uri": np.asarray(uris, dtype=object),
        "file_size": np.asarray(batch["file_size"], dtype=np.int64),
        "source_version": np.asarray([str(v) for v in batch["source_version"]], dtype=object),
        "data": np.asarray(data, dtype=object),
        "error_type": np.asarray(error_types, dtype=object),
        "error_message": np.asarray(messages, dtype=object),
        **found.columns(),
    }


def _read_failure(content: bytes | BaseException) -> ImageRejectedError | None:
    """A failed read as the error row :func:`decode_content` would make of it."""
    if isinstance(content, BadFileNameError):
        return ImageRejectedError(BAD_FILE_NAME, str(content))
    if isinstance(content, BaseException):
        return ImageRejectedError(UNREADABLE, unreadable_message(content))
    return None


def _fetch(
    uris: list[str], paths: list[str], storage_options: Mapping[str, Any]
) -> list[bytes | BaseException]:
    """Read every file of the batch; a failure that is the file's own is returned in its slot.

    ``cat_ranges`` takes the paths literally (``cat`` would expand ``[`` and ``*`` in names
    as globs) and lets async stores such as s3fs fetch the whole batch concurrently. On an
    object store any other failure (see ``LASTING_READ_ERRORS``) raises
    :class:`TransientReadError`, for Ray Data to retry the task.
    """
    if not uris:
        return []
    named = [i for i, path in enumerate(paths) if path]  # "": a name that is not UTF-8
    contents: list[bytes | BaseException] = [
        BadFileNameError(f"file name is not valid UTF-8 ({uri} as bytes): rename the file")
        for uri in uris
    ]
    if not named:
        return contents
    fs, _ = open_fs(uris[named[0]], storage_options)
    try:
        read = list(fs.cat_ranges([paths[i] for i in named], None, None, on_error="return"))
    except Exception as exc:  # the whole request failed: report it on every file
        read = [exc] * len(named)
    for i, content in zip(named, read, strict=True):
        contents[i] = content
    if not is_local(fs):
        for uri, content in zip(uris, contents, strict=True):
            if isinstance(content, BaseException) and not isinstance(content, LASTING_READ_ERRORS):
                raise TransientReadError(
                    f"{TRANSIENT_READ_ERROR} reading {uri}: {one_line(content, MESSAGE_CHARS)}"
                )
    return contents
