"""Decoding: upright original sizes, every mode to RGB, and bad files as typed error rows."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import ImageRejectedError, decode_batch, decode_image, to_rgb
from pipeline.listing import ListingCounts, list_images
from pipeline.preprocessing import preprocess_spec
from pipeline.storage import open_fs

SPEC = preprocess_spec("center-crop")
LIMIT = 89_478_485


def test_corpus_sizes_formats_and_errors(corpus) -> None:  # type: ignore[no-untyped-def]
    root, files = corpus
    for name, (data, upright, error_type) in files.items():
        if name.endswith(".txt"):
            continue
        if upright is None:
            with pytest.raises(ImageRejectedError) as info:
                decode_image(data, SPEC, max_image_pixels=LIMIT)
            assert info.value.error_type == error_type, name
            assert "\n" not in str(info.value)
            continue
        decoded = decode_image(data, SPEC, max_image_pixels=LIMIT)
        assert (decoded.original_width, decoded.original_height) == upright, name
        assert decoded.pixels.shape == (224, 224, 3) and decoded.pixels.dtype == np.uint8


def test_exif_orientation_is_applied_before_resizing(make_image) -> None:  # type: ignore[no-untyped-def]
    # Left half black, right half white, stored landscape; orientation 6 turns it portrait
    # with black on top.
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 40:] = 255
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(buffer.getvalue(), SPEC, max_image_pixels=LIMIT)
    assert (decoded.original_width, decoded.original_height) == (40, 80)
    assert decoded.pixels[:60].mean() < 30 and decoded.pixels[-60:].mean() > 225


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    np.testing.assert_array_equal(rgb[..., 0], np.arange(256).reshape(16, 16))
    # Through a PNG file too (Pillow may hand it back as "I;16" or "I").
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    rgb = np.asarray(to_rgb(Image.open(buffer)))
    np.testing.assert_array_equal(rgb[..., 1], np.arange(256).reshape(16, 16))


def test_transparency_is_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    rgba[0, 0] = (255, 0, 0, 255)  # one opaque red pixel
    rgb = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert (rgb[1:] == 255).all()
    palette = Image.fromarray(rgba, "RGBA").convert("P")
    palette.info["transparency"] = palette.getpixel((1, 1))
    assert tuple(np.asarray(to_rgb(palette))[2, 2]) == (255, 255, 255)


def test_cmyk_and_grayscale_become_rgb() -> None:
    assert to_rgb(Image.new("CMYK", (3, 3), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (3, 3), 7)).getpixel((1, 1)) == (7, 7, 7)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue(), SPEC, max_image_pixels=LIMIT)
    red, _, blue = decoded.pixels.reshape(-1, 3).mean(axis=0)
    assert red > 200 and blue < 50


def test_header_over_the_pixel_limit_is_a_bomb_before_decoding(make_image) -> None:  # type: ignore[no-untyped-def]
    data = make_image((100, 100), fmt="PNG")
    with pytest.raises(ImageRejectedError) as info:
        decode_image(data, SPEC, max_image_pixels=5_000)
    assert info.value.error_type == "decompression_bomb"


def test_extreme_strip_is_refused_before_resizing(make_image) -> None:  # type: ignore[no-untyped-def]
    data = make_image((2000, 1), fmt="PNG")
    with pytest.raises(ImageRejectedError) as info:
        decode_image(data, SPEC, max_image_pixels=100_000)
    assert info.value.error_type == "extreme_aspect_ratio"


def test_formats_outside_the_list_are_not_opened() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PPM")  # Pillow reads PPM; we do not
    with pytest.raises(ImageRejectedError) as info:
        decode_image(buffer.getvalue(), SPEC, max_image_pixels=LIMIT)
    assert info.value.error_type == "not_an_image"


def test_png_named_jpg_decodes_by_content(make_image) -> None:  # type: ignore[no-untyped-def]
    decoded = decode_image(make_image((31, 17), fmt="PNG"), SPEC, max_image_pixels=LIMIT)
    assert decoded.format == "PNG" and (decoded.original_width, decoded.original_height) == (31, 17)


def test_a_bad_file_costs_its_batch_neighbours_nothing(corpus) -> None:  # type: ignore[no-untyped-def]
    root, files = corpus
    fs, path = open_fs(str(root))
    (table,) = list_images(fs, path, ListingCounts(), chunk_rows=100)
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.schema.names}
    batch["path"] = np.append(batch["path"], str(root / "vanished.jpg"))
    batch["uri"] = np.append(batch["uri"], str(root / "vanished.jpg"))
    batch["file_size"] = np.append(batch["file_size"], 10)
    out = decode_batch(batch, spec=SPEC, storage_options={}, max_image_pixels=LIMIT)
    by_name = {Path(u).relative_to(root).as_posix(): i for i, u in enumerate(out["uri"])}
    for name, (data, upright, error_type) in files.items():
        if name.endswith(".txt"):
            assert name not in by_name
            continue
        i = by_name[name]
        if upright is None:
            assert out["error_type"][i] == error_type
            assert not out["image"][i].any()
        else:
            assert out["error_type"][i] == "" and out["error_message"][i] == ""
            assert (out["original_width"][i], out["original_height"][i]) == upright
            expected = decode_image(data, SPEC, max_image_pixels=LIMIT).pixels
            np.testing.assert_array_equal(out["image"][i], expected)
    assert out["error_type"][by_name["vanished.jpg"]] == "unreadable"


def test_on_s3_a_gone_object_is_a_row_and_a_throttled_read_fails_the_task(
    s3_bucket, s3_endpoint, make_image
) -> None:  # type: ignore[no-untyped-def]
    from pipeline.decode import TRANSIENT_READ_ERROR, TransientReadError

    s3, bucket = s3_bucket
    s3.pipe(f"{bucket}/a.png", make_image((30, 20), fmt="PNG"))
    batch = {
        "uri": np.array([f"s3://{bucket}/a.png", f"s3://{bucket}/gone.png"], dtype=object),
        "path": np.array([f"{bucket}/a.png", f"{bucket}/gone.png"], dtype=object),
        "file_size": np.array([1, 1]),
        "source_version": np.array(["", ""], dtype=object),
    }
    options = {"endpoint_url": s3_endpoint}
    out = decode_batch(batch, spec=SPEC, storage_options=options, max_image_pixels=LIMIT)
    assert list(out["error_type"]) == ["", "unreadable"]
    assert (out["original_width"][0], out["original_height"][0]) == (30, 20)
    # Nothing listens on port 9: every try is a refused connection, a passing failure.
    dead = {
        "endpoint_url": "http://127.0.0.1:9",
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
    }
    with pytest.raises(TransientReadError, match=f"{TRANSIENT_READ_ERROR} reading s3://"):
        decode_batch(batch, spec=SPEC, storage_options=dead, max_image_pixels=LIMIT)


def test_a_task_reads_its_files_a_bounded_number_of_bytes_at_a_time(corpus, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A decode task of many rows holds at most FETCH_BYTES of files (by the listing's sizes)
    at once, and decodes each group before reading the next: the rows come out the same."""
    from pipeline import decode as decode_module

    root, _ = corpus
    fs, path = open_fs(str(root))
    (table,) = list_images(fs, path, ListingCounts(), chunk_rows=100)
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.schema.names}
    whole = decode_batch(batch, spec=SPEC, storage_options={}, max_image_pixels=LIMIT)
    largest = int(max(batch["file_size"]))
    reads: list[int] = []
    fetch = decode_module._fetch

    def counting(uris, paths, options):  # type: ignore[no-untyped-def]
        reads.append(sum(Path(p).stat().st_size for p in paths))
        return fetch(uris, paths, options)

    monkeypatch.setattr(decode_module, "_fetch", counting)
    monkeypatch.setattr(decode_module, "FETCH_BYTES", largest)
    grouped = decode_batch(batch, spec=SPEC, storage_options={}, max_image_pixels=LIMIT)
    assert len(reads) > 1 and max(reads) <= largest
    for key, value in whole.items():
        np.testing.assert_array_equal(grouped[key], value)


def test_byte_groups() -> None:
    from pipeline.decode import byte_groups

    assert byte_groups([5, 5, 5, 20, 1], 10) == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 5)]
    assert byte_groups([], 10) == []
    assert byte_groups([1] * 5, 100) == [slice(0, 5)]
