"""Listing: image extensions only (case-insensitively), counts, stable order; local and S3."""

from __future__ import annotations

import pytest

from pipeline.listing import InputError, ListingCounts, has_image_extension, list_images
from pipeline.storage import open_fs


def test_extensions_are_matched_case_insensitively() -> None:
    for name in ("a.jpg", "b.JPEG", "c.Png", "d.webp", "e.BMP", "f.tif", "g.TIFF", "h.gif"):
        assert has_image_extension(name), name
    for name in ("a.txt", "b.eps", "c", "d.jpg.bak", ".jpg.json"):
        assert not has_image_extension(name), name


def test_local_listing_counts_and_orders(corpus) -> None:  # type: ignore[no-untyped-def]
    root, files = corpus
    fs, path = open_fs(str(root))
    counts = ListingCounts()
    tables = list(list_images(fs, path, counts, chunk_rows=4))
    uris = [u for t in tables for u in t.column("uri").to_pylist()]
    assert all(t.num_rows <= 4 for t in tables)
    images = sorted(str(root / n) for n in files if not n.endswith(".txt"))
    assert sorted(uris) == images
    assert counts.listed == len(images) and counts.skipped_by_extension == 1
    sizes = dict(
        zip(uris, [s for t in tables for s in t.column("file_size").to_pylist()], strict=True)
    )
    assert sizes[str(root / "rgb.jpg")] == len(files["rgb.jpg"][0])
    # The same order every time, so that --limit is reproducible.
    again = [
        u
        for t in list_images(fs, path, ListingCounts(), chunk_rows=4)
        for u in t["uri"].to_pylist()
    ]
    assert again == uris


def test_limit_stops_the_listing(corpus) -> None:  # type: ignore[no-untyped-def]
    root, _ = corpus
    fs, path = open_fs(str(root))
    counts = ListingCounts()
    tables = list(list_images(fs, path, counts, chunk_rows=100, limit=3))
    assert sum(t.num_rows for t in tables) == 3 and counts.listed == 3


def test_missing_input_is_an_input_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fs, path = open_fs(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="input not found"):
        list(list_images(fs, path, ListingCounts(), chunk_rows=10))


def test_s3_listing_through_a_real_endpoint(corpus, s3_bucket, s3_endpoint) -> None:  # type: ignore[no-untyped-def]
    root, files = corpus
    s3, bucket = s3_bucket
    s3.put(str(root) + "/", f"{bucket}/photos/", recursive=True)
    fs, path = open_fs(f"s3://{bucket}/photos/", {"endpoint_url": s3_endpoint})
    expected = sorted(f"s3://{bucket}/photos/{n}" for n in files if not n.endswith(".txt"))
    for concurrency in (1, 4):  # one chain; split by folders ("sub/dir/")
        counts = ListingCounts()
        uris = [
            u
            for t in list_images(fs, path, counts, chunk_rows=5, concurrency=concurrency)
            for u in t["uri"].to_pylist()
        ]
        assert sorted(uris) == expected
        assert counts.skipped_by_extension == 1


class FakeStore:
    """Just enough of s3fs for the lister: a paginated async listing of ``n`` synthetic keys."""

    def __init__(self, n: int) -> None:
        import fsspec.asyn

        self.n = n
        self.loop = fsspec.asyn.get_loop()

    def isfile(self, path: str) -> bool:
        return False

    def isdir(self, path: str) -> bool:
        return True

    def unstrip_protocol(self, path: str) -> str:
        return f"s3://{path}"

    async def _iterdir(self, bucket: str, delimiter: str, prefix: str):  # type: ignore[no-untyped-def]
        assert delimiter == ""  # recursive, in key order
        for i in range(self.n):
            yield {
                "name": f"{bucket}/{prefix}{i:09d}.jpg",
                "type": "file",
                "size": 1,
                "ETag": f'"{i:x}"',
            }


def _peak_listing_memory(n: int) -> int:
    import tracemalloc

    counts = ListingCounts()
    tracemalloc.start()
    try:
        rows = sum(
            t.num_rows for t in list_images(FakeStore(n), "bucket/photos", counts, chunk_rows=256)
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == counts.listed == n
    return peak


def test_listing_memory_stays_flat_as_keys_grow() -> None:
    small, large = _peak_listing_memory(20_000), _peak_listing_memory(200_000)
    # Ten times the keys, the same peak (chunks are handed on, never accumulated).
    assert large < 1.5 * small, (small, large)


def _listed(store, concurrency: int) -> tuple[list[str], ListingCounts]:  # type: ignore[no-untyped-def]
    counts = ListingCounts()
    tables = list_images(store, "bucket/photos", counts, chunk_rows=100, concurrency=concurrency)
    return [u for t in tables for u in t["uri"].to_pylist()], counts


def test_a_prefix_is_split_by_folders_and_listed_concurrently_each_key_once() -> None:
    from bench.scale import PagedStore, folder_keys

    keys = [
        *folder_keys(3000, 7),
        "photos/top.jpg",  # beside the folders
        "photos/0003/deeper/a.png",  # below them
    ]
    images = sorted(f"s3://bucket/{k}" for k in keys if not k.endswith(".txt"))
    serial = PagedStore(keys, latency=0.01)
    one, counts_one = _listed(serial, 1)
    assert serial.max_in_flight == 1
    parallel = PagedStore(keys, latency=0.01)
    many, counts_many = _listed(parallel, 4)
    assert parallel.max_in_flight == 4  # four requests at once
    assert sorted(one) == sorted(many) == images  # each key once
    assert len(many) == len(set(many))
    assert counts_one.skipped_by_extension == counts_many.skipped_by_extension == 7
    assert _listed(PagedStore(keys), 4)[0] == many  # the same order on every run


def test_a_flat_prefix_is_listed_whole() -> None:
    from bench.scale import PagedStore

    keys = [f"photos/{i:06d}.jpg" for i in range(1500)]
    store = PagedStore(keys)
    uris, _ = _listed(store, 8)
    assert uris == [f"s3://bucket/{k}" for k in keys]
    # One short delimiter page to learn there are no folders, then one chain of two pages.
    assert store.requests == 3


def test_a_failing_shard_fails_the_listing_with_its_error() -> None:
    from bench.scale import PagedStore, folder_keys

    class Denied(PagedStore):
        def _entries(self, prefix, delimiter):  # type: ignore[no-untyped-def]
            if prefix == "photos/0002/":
                raise PermissionError("Access Denied")
            return super()._entries(prefix, delimiter)

    with pytest.raises(InputError, match="permission denied"):
        _listed(Denied(folder_keys(500, 4)), 4)


def _keys(tables) -> list[tuple[str, int, str]]:  # type: ignore[no-untyped-def]
    return sorted(
        (u, s, v)
        for t in tables
        for u, s, v in zip(
            t["uri"].to_pylist(),
            t["file_size"].to_pylist(),
            t["source_version"].to_pylist(),
            strict=True,
        )
    )


def test_a_uri_list_feeds_the_listing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.inventory import list_tables

    photos = tmp_path / "photos"
    fs, root = open_fs(str(photos))
    uris = [
        f"{photos}/a.jpg",
        f"file://{photos}/b.png",
        f"{tmp_path}/elsewhere/c.jpg",
        f"{photos}/notes.txt",
        f"{photos}2/d.jpg",  # a sibling whose name starts with the input's
    ]
    table = pa.table(
        {"uri": uris, "size": [1, 2, 3, 4, 5], "version": ["v1", "v2", "v3", "v4", "v5"]}
    )
    pq.write_table(table, tmp_path / "list.parquet")
    pa.csv.write_csv(table, tmp_path / "list.csv")
    for name in ("list.parquet", "list.csv"):
        counts = ListingCounts()
        tables = list_tables(str(tmp_path / name), str(photos))
        listed = list(list_images(fs, root, counts, chunk_rows=10, tables=tables))
        assert _keys(listed) == [
            (f"{photos}/a.jpg", 1, "version:v1"),
            (f"{photos}/b.png", 2, "version:v2"),
        ], name
        assert (counts.listed, counts.skipped_by_extension) == (2, 1)  # c, d: not under input

    (tmp_path / "list.txt").write_text(f"{photos}/a.jpg\n\n{photos}/sub/d.webp\n")
    tables = list_tables(str(tmp_path / "list.txt"), str(photos))
    listed = list(list_images(fs, root, ListingCounts(), chunk_rows=10, tables=tables))
    assert [k[0] for k in _keys(listed)] == [f"{photos}/a.jpg", f"{photos}/sub/d.webp"]
    assert [k[2] for k in _keys(listed)] == ["", ""]  # no version column: none is made up
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="no 'uri' column"):
        list(list_tables(str(tmp_path / "bad.parquet"), str(photos)))
    with pytest.raises(InputError, match="--input-list not found"):
        list(list_tables(str(tmp_path / "missing.txt"), str(photos)))


@pytest.mark.parametrize("limit", [None, 7])
def test_listed_tables_become_chunks_of_images_in_order(limit) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    from pipeline.inventory import LIST_SCHEMA

    def table(names: list[str]) -> pa.Table:
        n = len(names)
        return pa.table(
            [names, names, [0] * n, [""] * n, [name.endswith(".jpg") for name in names]],
            schema=LIST_SCHEMA,
        )

    names = [[f"{i}.jpg" for i in range(5)], ["x.txt"], [f"{i}.jpg" for i in range(5, 12)]]
    # Several chunks per table, as Ray Data's blocks come.
    tables = [pa.concat_tables([table(n[:2]), table(n[2:])]) for n in names]
    counts = ListingCounts()
    chunks = list(list_images(None, "", counts, chunk_rows=3, limit=limit, tables=tables))
    wanted = [f"{i}.jpg" for i in range(12)][:limit]
    assert [c["path"].to_pylist() for c in chunks] == [
        wanted[i : i + 3] for i in range(0, len(wanted), 3)
    ]
    assert all(c["path"].num_chunks == 1 for c in chunks)
    assert (counts.listed, counts.skipped_by_extension) == (len(wanted), 1)


def test_a_list_names_images_as_the_listing_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The list's vectorized extension check agrees with ``has_image_extension``."""
    from pipeline.inventory import list_tables

    names = [
        "a.jpg", "b.JPEG", "c.Png", "d.webp", "e.BMP", "f.tif", "g.TIFF", "h.gif", "a.txt",
        "b.eps", "c", "d.jpg.bak", ".jpg.json", ".jpg", "..jpeg", ".hidden.png", "x.y.gif",
        "dir.jpg/file", "dir.jpg/.png", "a b.jpg", "é.jpg", "jpg",
    ]  # fmt: skip
    (tmp_path / "list.txt").write_text("".join(f"{tmp_path}/in/{n}\n" for n in names))
    (table,) = list_tables(str(tmp_path / "list.txt"), str(tmp_path / "in"))
    assert table["image"].to_pylist() == [has_image_extension(n) for n in names]


@pytest.mark.parametrize(
    ("file_format", "in_ray"), [("CSV", False), ("Parquet", False), ("ORC", False), ("CSV", True)]
)
def test_an_s3_inventory_gives_the_keys_list_gives(
    corpus, s3_bucket, s3_endpoint, file_format, in_ray, request
) -> None:  # type: ignore[no-untyped-def]
    import gzip
    import io
    import json
    from urllib.parse import quote_plus

    import pyarrow as pa
    import pyarrow.orc as orc
    import pyarrow.parquet as pq

    from pipeline.feed import read_list
    from pipeline.inventory import InputList

    if in_ray:
        request.getfixturevalue("ray_session")
    root, _ = corpus
    s3, bucket = s3_bucket
    s3.put(str(root) + "/", f"{bucket}/photos/", recursive=True)
    s3.pipe(f"{bucket}/photos/with space+plus%.jpg", b"x")  # a key CSV inventories escape
    options = {"endpoint_url": s3_endpoint}
    fs, path = open_fs(f"s3://{bucket}/photos/", options)
    listed = _keys(list_images(fs, path, ListingCounts(), chunk_rows=100))
    # The report as S3 Inventory writes it: the bucket's objects (and one of another prefix),
    # in two data files.
    objects = [o for o in s3.find(bucket, detail=True).values() if o["type"] == "file"]
    objects.append({"name": f"{bucket}/other/x.jpg", "size": 1, "ETag": '"0"'})
    rows = {
        "bucket": [bucket] * len(objects),
        "key": [o["name"].split("/", 1)[1] for o in objects],
        "size": [int(o["size"]) for o in objects],
        "e_tag": [str(o["ETag"]).strip('"') for o in objects],
    }
    files = []
    for part, (start, stop) in enumerate([(0, 5), (5, len(objects))]):
        chunk = {k: v[start:stop] for k, v in rows.items()}
        buffer = io.BytesIO()
        if file_format == "CSV":
            text = "".join(
                f'"{b}","{quote_plus(k, safe="/")}","{s}","{e}"\n'
                for b, k, s, e in zip(*chunk.values(), strict=True)
            )
            data, name = gzip.compress(text.encode()), f"data/part-{part}.csv.gz"
        elif file_format == "Parquet":
            pq.write_table(pa.table(chunk), buffer)
            data, name = buffer.getvalue(), f"data/part-{part}.parquet"
        else:
            orc.write_table(pa.table(chunk), buffer)
            data, name = buffer.getvalue(), f"data/part-{part}.orc"
        s3.pipe(f"{bucket}/inventory/{name}", data)
        files.append({"key": f"inventory/{name}", "size": len(data), "MD5checksum": ""})
    manifest = {
        "sourceBucket": bucket,
        "destinationBucket": f"arn:aws:s3:::{bucket}",
        "fileFormat": file_format,
        "fileSchema": "Bucket, Key, Size, ETag",
        "files": files,
    }
    s3.pipe(f"{bucket}/inventory/manifest.json", json.dumps(manifest).encode())
    counts = ListingCounts()
    inventory = InputList.open(
        f"s3://{bucket}/inventory/manifest.json", f"s3://{bucket}/photos/", options
    )
    tables = read_list(inventory) if in_ray else inventory.tables()
    from_list = _keys(list_images(fs, path, counts, chunk_rows=100, tables=tables))
    assert from_list == listed  # same URIs, sizes and versions: the diff treats them alike
    assert counts.skipped_by_extension == 1


def test_a_prefix_of_more_folders_than_a_page_is_still_split() -> None:
    from bench.scale import PagedStore, folder_keys

    keys = folder_keys(3000, 1500)  # 1,500 folders: a delimiter listing of two pages
    store = PagedStore(keys, latency=0.005)
    uris, _ = _listed(store, 8)
    assert sorted(uris) == sorted(f"s3://bucket/{k}" for k in keys if k.endswith(".jpg"))
    assert store.max_in_flight == 8
