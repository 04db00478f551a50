"""Reuse by content (pipeline.reuse): an image whose bytes the table holds already is not
decoded and not run through the model; its row copies the stored vector, size and format.
Found by the sha256 of the bytes read, or, before any read, by a single-part ETag."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from pipeline.compact import compact
from pipeline.config import EmbedConfig
from pipeline.decode import decode_batch, fetch_batch
from pipeline.embed import EMBEDDING_DIM, ResNet50Embedder
from pipeline.preprocessing import preprocess_spec
from pipeline.read import read_embeddings, read_manifest
from pipeline.reuse import CONTENT_COLUMN, content_index, fill_reused
from pipeline.run import execute_run, prepare_run
from pipeline.storage import open_fs
from pipeline.write import ROW_GROUP_ROWS, write_batch

IMAGES = 8
# The model stages below run in Ray's workers, which cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FromPixels(ResNet50Embedder):
    """The model stage's own row selection, without a model: a vector seeded by the pixels."""

    def __init__(self, **kwargs: Any) -> None:  # no weights, no torch
        self.decode_spec = None

    def embed(self, images: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                np.random.default_rng(zlib.crc32(image.tobytes())).standard_normal(EMBEDDING_DIM)
                for image in images
            ]
        ).astype(np.float32)


class NoForward(FromPixels):
    """Fails the run if a single image reaches the forward pass."""

    def embed(self, images: np.ndarray) -> np.ndarray:
        raise AssertionError(f"a forward pass on {len(images)} images that the table holds")


# -- the index, the decode stage and the writer, in this process --------------------------


def _stored(tmp_path: Path, versions: list[str], digests: list[bytes | None]) -> Path:
    """A table folder with one file of rows 0..n-1 written by write_batch."""
    n = len(versions)
    batch = {
        "uri": np.array([f"s3://b/{i}.png" for i in range(n)], dtype=object),
        "file_size": np.arange(n, dtype=np.int64) + 100,
        "source_version": np.array(versions, dtype=object),
        "original_width": np.arange(n, dtype=np.int32) + 10,
        "original_height": np.arange(n, dtype=np.int32) + 20,
        "format": np.array(["PNG"] * n, dtype=object),
        "error_type": np.array([""] * n, dtype=object),
        "error_message": np.array([""] * n, dtype=object),
        "embedding": np.arange(n * EMBEDDING_DIM, dtype=np.float32).reshape(n, -1),
        CONTENT_COLUMN: np.array([d or b"" for d in digests], dtype=object),
    }
    write_batch(batch, staging_uri=str(tmp_path), storage_options={}, metadata={})
    return tmp_path


def test_the_index_finds_rows_by_sha256_and_by_single_part_etag_only(tmp_path: Path) -> None:
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(4)]
    md5 = hashlib.md5(b"x").hexdigest()
    versions = [f"etag:{md5}", "etag:" + "ab" * 16 + "-3", "mtime:5", f"etag:{md5}"]
    root = _stored(tmp_path, versions, [digests[0], digests[1], digests[2], None])
    files = [p.relative_to(root).as_posix() for p in root.rglob("*.parquet")]
    index = content_index(str(root), files)
    assert len(index) == 3  # the row without a digest (an older table's) is not indexed
    at = index.find([digests[2], hashlib.sha256(b"other").digest(), b"", digests[0]])
    assert at[1:3].tolist() == [-1, -1]
    assert index.row[at[0]] == 2 and index.row[at[3]] == 0
    # A single-part ETag finds a row with the same size; a multipart one, or another size, not.
    found = index.find_etags(
        [f"etag:{md5}", f"etag:{md5}", "etag:" + "ab" * 16 + "-3"], [100, 7, 101]
    )
    assert found[0] >= 0 and index.row[found[0]] == 0
    assert found[1:].tolist() == [-1, -1]
    assert len(content_index(str(root), files, by_etag=False).etags) == 0


def test_a_writer_copies_the_stored_row_reading_only_its_row_group(tmp_path: Path) -> None:
    n = ROW_GROUP_ROWS + 5
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(n)]
    root = _stored(tmp_path, ["mtime:1"] * n, digests)  # type: ignore[arg-type]
    (path,) = root.rglob("*.parquet")
    assert pq.ParquetFile(path).num_row_groups == 2
    index = content_index(str(root), [path.relative_to(root).as_posix()])
    wanted = [n - 1, 3]
    batch = {
        "uri": np.array(["new/a.png", "new/b.png", "new/c.png"], dtype=object),
        "reuse": index.find([digests[wanted[0]], b"", digests[wanted[1]]]),
        CONTENT_COLUMN: np.array([digests[wanted[0]], b"", digests[wanted[1]]], dtype=object),
        "embedding": np.zeros((3, EMBEDDING_DIM), np.float32),
        "original_width": np.zeros(3, np.int32),
        "original_height": np.zeros(3, np.int32),
        "format": np.array(["", "JPEG", ""], dtype=object),
    }
    assert fill_reused(batch, index, {}) == 2
    assert batch["original_width"].tolist() == [10 + n - 1, 0, 13]
    assert batch["format"].tolist() == ["PNG", "JPEG", "PNG"]
    assert batch["embedding"][0, 0] == (n - 1) * EMBEDDING_DIM
    assert batch["embedding"][2, -1] == 4 * EMBEDDING_DIM - 1 and not batch["embedding"][1].any()
    # A digest that is not the stored row's is refused, not copied.
    batch["reuse"][1] = batch["reuse"][0]
    batch[CONTENT_COLUMN][1] = hashlib.sha256(b"another").digest()
    with pytest.raises(ValueError, match="new/b.png: the stored row found by its content"):
        fill_reused(batch, index, {})


def test_decode_skips_found_images_and_never_reads_those_found_by_etag(
    tmp_path: Path, make_image: Any
) -> None:
    known, fresh = make_image((30, 20), seed=1), make_image((30, 20), seed=2)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "known.jpg").write_bytes(known)
    (tmp_path / "in" / "fresh.jpg").write_bytes(fresh)
    md5 = hashlib.md5(b"etag-found").hexdigest()
    root = _stored(
        tmp_path / "table",
        ["mtime:1", f"etag:{md5}"],
        [hashlib.sha256(known).digest(), hashlib.sha256(b"etag-found").digest()],
    )
    index = content_index(
        str(root), [p.relative_to(root).as_posix() for p in root.rglob("*.parquet")]
    )
    paths = [str(tmp_path / "in" / n) for n in ("known.jpg", "fresh.jpg", "gone.jpg")]
    batch = {
        "uri": np.array(paths, dtype=object),
        "path": np.array(paths, dtype=object),
        # gone.jpg does not exist: found by its ETag, it is never read (else: unreadable).
        "file_size": np.array([len(known), len(fresh), 101], dtype=np.int64),
        "source_version": np.array(["mtime:9", "mtime:9", f"etag:{md5}"], dtype=object),
    }
    spec = preprocess_spec("center-crop")
    out = decode_batch(batch, spec=spec, storage_options={}, max_image_pixels=10**8, reuse=index)
    assert out["error_type"].tolist() == ["", "", ""]
    assert out["reuse"][0] >= 0 and out["reuse"][1] == -1 and out["reuse"][2] >= 0
    assert not out["image"][0].any() and out["image"][1].any() and not out["image"][2].any()
    assert out["original_width"].tolist() == [0, 30, 0]  # the writer copies the stored ones
    assert out[CONTENT_COLUMN].tolist() == [
        hashlib.sha256(known).digest(),
        hashlib.sha256(fresh).digest(),
        b"",  # unread: the writer copies the stored digest
    ]
    plain = decode_batch(batch, spec=spec, storage_options={}, max_image_pixels=10**8)
    assert plain["error_type"].tolist() == ["", "", "unreadable"]
    assert plain["reuse"].tolist() == [-1, -1, -1] and plain["original_width"][0] == 30
    # Where the model actors decode (--decode-device cuda), found images' bytes are not sent.
    fetched = fetch_batch(batch, storage_options={}, reuse=index)
    assert fetched["data"].tolist() == [b"", fresh, b""]
    assert fetched["reuse"].tolist() == out["reuse"].tolist()
    assert fetched[CONTENT_COLUMN].tolist() == out[CONTENT_COLUMN].tolist()


# -- whole runs, on local disk and on moto's S3 -------------------------------------------


def _rows(output: str, options: dict[str, str]) -> dict[str, dict[str, Any]]:
    table = read_embeddings(output, storage_options=options)
    return {
        uri.rsplit("/", 1)[1]: row
        for uri, row in zip(table["uri"].to_pylist(), table.to_pylist(), strict=True)
    }


@pytest.fixture
def photos(request, tmp_path, make_image) -> tuple[Any, str, dict[str, str]]:  # type: ignore[no-untyped-def]
    """IMAGES images under photos/a/, on local disk or on moto's S3: (fs, root, options)."""
    if request.param == "s3":
        fs, bucket = request.getfixturevalue("s3_bucket")
        root, options = f"{bucket}/photos", {"endpoint_url": request.getfixturevalue("s3_endpoint")}
    else:
        fs, _ = open_fs(str(tmp_path), {})
        root, options = str(tmp_path / "photos"), {}
    fs.makedirs(f"{root}/a", exist_ok=True)  # a folder on local disk; nothing on S3
    for i in range(IMAGES):
        fs.pipe_file(f"{root}/a/{i}.png", make_image((20 + i, 16), fmt="PNG", seed=i))
    return fs, root, options


def _move(fs: Any, root: str, src: str, dst: str) -> None:
    """Move every image to new keys (a server-side copy on S3: it keeps the ETag), and copy
    one of them besides."""
    fs.makedirs(f"{root}/{dst}", exist_ok=True)
    for path in fs.find(f"{root}/{src}"):
        fs.copy(path, path.replace(f"/{src}/", f"/{dst}/"))
        fs.rm(path)
    fs.copy(f"{root}/{dst}/3.png", f"{root}/{dst}/copy-of-3.png")


@pytest.mark.parametrize("photos", ["local", "s3"], indirect=True)
def test_moved_renamed_and_copied_images_cost_no_forward_pass(ray_session, photos) -> None:  # type: ignore[no-untyped-def]
    fs, root, options = photos
    prefix = "s3://" if options else ""
    config = EmbedConfig(
        input=f"{prefix}{root}",
        output=f"{prefix}{root}-out",
        weights="random",
        reuse="sha256",
        batch_size=4,
        decode_batch_size=4,
        rows_per_file=4,
        storage_options=options,
    )
    first = execute_run(prepare_run(config), embedder=FromPixels)
    assert (first.counts.embedded, first.counts.reused) == (IMAGES, 0)
    before = _rows(config.output, options)

    _move(fs, root, "a", "b")
    moved = execute_run(prepare_run(config), embedder=NoForward)
    assert (moved.counts.embedded, moved.counts.reused, moved.counts.deleted) == (9, 9, IMAGES)
    after = _rows(config.output, options)
    assert sorted(after) == sorted([*before, "copy-of-3.png"])
    for name, row in after.items():
        stored = before[name.replace("copy-of-", "")]
        for column in ("embedding", "original_width", "original_height", "format"):
            assert row[column] == stored[column], (name, column)
        data = fs.cat_file(f"{root}/b/{name}")
        assert row[CONTENT_COLUMN] == hashlib.sha256(data).digest() == stored[CONTENT_COLUMN]
        assert row["uri"] == f"{prefix}{root}/b/{name}"
    (record,) = [r for r in read_manifest(config.output, storage_options=options).runs[-1:]]  # type: ignore[union-attr]
    assert record.counts.reused == 9

    # --reuse off embeds them: the model sees them again.
    _move(fs, root, "b", "c")
    with pytest.raises(Exception, match="a forward pass on"):
        execute_run(prepare_run(dataclasses.replace(config, reuse="off")), embedder=NoForward)


class Requests:
    """What moto's S3 server (it runs in this process) is asked for: [(method, url)]."""

    def __init__(self, location: Path) -> None:
        from moto.moto_api import recorder

        self.recorder = recorder
        # Where moto keeps its recording (a file, by default in the working folder).
        recorder._location = str(location)
        self.clear()

    def clear(self) -> None:
        self.recorder.reset_recording()
        self.recorder.start_recording()

    def made(self) -> list[tuple[str, str]]:
        lines = self.recorder.download_recording().splitlines()
        return [(r["method"], r["url"]) for r in map(json.loads, lines)]


@pytest.fixture
def s3_requests(tmp_path: Path) -> Iterator[Requests]:
    requests = Requests(tmp_path / "moto_recording")
    try:
        yield requests
    finally:
        requests.recorder.stop_recording()
        requests.recorder.reset_recording()


@pytest.mark.parametrize("photos", ["s3"], indirect=True)
def test_images_whose_etag_the_table_holds_are_not_even_read(
    ray_session, photos, s3_requests
) -> None:  # type: ignore[no-untyped-def]
    fs, root, options = photos
    config = EmbedConfig(
        input=f"s3://{root}",
        output=f"s3://{root}-out",
        weights="random",
        batch_size=4,
        decode_batch_size=4,
        rows_per_file=4,
        storage_options=options,
    )
    execute_run(prepare_run(config), embedder=FromPixels)
    first_reads = [u for m, u in s3_requests.made() if m == "GET" and "/photos/a/" in u]
    assert len(first_reads) == IMAGES  # the recording sees the decode tasks' reads
    _move(fs, root, "a", "b")
    s3_requests.clear()
    moved = execute_run(prepare_run(config), embedder=NoForward)
    assert (moved.counts.embedded, moved.counts.reused) == (9, 9)
    reads = [u for m, u in s3_requests.made() if m == "GET" and "/photos/b/" in u]
    assert reads == [], reads
    assert all(row[CONTENT_COLUMN] for row in _rows(config.output, options).values())


def test_a_table_from_before_the_digest_column_reads_and_reuses_nothing(
    ray_session, tmp_path, make_image
) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    for i in range(4):
        (photos / "a" / f"{i}.png").write_bytes(make_image((20 + i, 16), fmt="PNG", seed=i))
    config = EmbedConfig(
        input=str(photos), output=str(tmp_path / "out"), weights="random", batch_size=4
    )
    execute_run(prepare_run(config), embedder=FromPixels)
    for path in (tmp_path / "out" / "embeddings").rglob("*.parquet"):  # as 0.8 wrote them
        old = pq.read_table(path)
        pq.write_table(old.drop_columns([CONTENT_COLUMN]), path)
    assert read_embeddings(config.output)[CONTENT_COLUMN].null_count == 4
    compact(config.output)  # reads the old files with the table's schema: nulls
    assert read_embeddings(config.output)[CONTENT_COLUMN].null_count == 4
    (photos / "a").rename(photos / "b")
    again = execute_run(prepare_run(config), embedder=FromPixels)
    assert (again.counts.embedded, again.counts.reused) == (4, 0)
    table = read_embeddings(config.output)
    assert table.num_rows == 4 and table[CONTENT_COLUMN].null_count == 0
    assert table.schema.field(CONTENT_COLUMN).type == pa.binary(32)
