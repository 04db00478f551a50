"""Bookkeeping at scale: what the driver costs per listed and per committed image.

    python -m bench.scale diff --keys 10000000 --changed 0.01
    python -m bench.scale listing --keys 200000 --folders 100 --page-latency 0.1
    python -m bench.scale listing --moto --keys 20000 --folders 20
    python -m bench.scale commit --files 1000
    python -m bench.scale manifest --images 10000000 --nights 365 --compact-every 7
    python -m bench.scale local --files 200000
    python -m bench.scale first-chunk --keys 10000000
    python -m bench.scale first-batch --keys 10000000
    python -m bench.scale input-list --keys 10000000
    python -m bench.scale reuse-index --rows 10000000

No model and no image is involved: each part measures the driver's own work.

- ``diff``: an output with two committed runs (``--keys`` images, then ``--changed`` of them
  changed) is written as narrow Parquet files (the key columns only); then, in a fresh
  process, the real diff reads the current keys from it and diffs a listing of ``--keys``
  images (the same ``--changed`` share changed again) in the run's listing chunks
  (``LISTING_BLOCK_ROWS``). It reports the time to read and index the committed keys, the
  time to diff the listing, and the process's peak RSS.
- ``listing``: the concurrent lister against a fake paginated store that answers each page
  of 1,000 keys after ``--page-latency`` seconds: keys/s at concurrency 1 and at the
  default.
- ``commit``: ``commit_run`` of ``--files`` staged files to moto's S3 server.
- ``manifest``: the manifest's size, and the time to build and serialize it, over a year of
  simulated nightly runs with weekly compaction.
- ``local``: two runs of the command over zero-byte files (every one an error row: the
  plan's bookkeeping without decode or model).
- ``first-chunk``: how soon the lister finds ``--block-rows`` listing rows (a block's worth).
- ``first-batch``: a run's time to its model stage's first batch, over a fake listing.
- ``input-list``: an ``--input-list`` of ``--keys`` URIs (Parquet with sizes and versions, and
  plain text) read into the run's listing chunks (``LISTING_BLOCK_ROWS``), in the driver (as a
  dry run does) and by Ray Data (as a run does): wall time, and the driver's CPU per key.
- ``reuse-index``: a table of ``--rows`` rows in files of 4,096 (only the columns the index
  reads: ``content_sha256``, a single-part ``etag:`` version, ``file_size``); then, in a fresh
  process, :func:`pipeline.reuse.content_index` over it, as a run builds it before its plan:
  wall time, peak RSS, the index's bytes, and the time of 4,096 lookups.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.results import append

PAGE = 1000


def synthetic_keys(start: int, stop: int, *, generation: int, changed: float) -> pa.Table:
    """Listing-shaped rows for images ``start..stop``; a ``changed`` share of them (the same
    ones for every generation) carry a version that depends on ``generation``."""
    i = pa.array(np.arange(start, stop, dtype=np.int64))
    step = max(1, round(1 / changed)) if changed else 0
    gen = np.zeros(stop - start, dtype=np.int64)
    if step:
        gen[(np.arange(start, stop) % step) == 0] = generation
    uri = pc.binary_join_element_wise(
        "s3://bucket/images/",
        pc.cast(pc.divide(i, 1000), pa.string()),
        "/IMG_",
        pc.cast(i, pa.string()),
        ".jpg",
        "",
    )
    version = pc.binary_join_element_wise(
        "etag:", pc.cast(i, pa.string()), pc.cast(pa.array(gen), pa.string()), "-"
    )
    return pa.table(
        {
            "uri": uri,
            "path": uri,
            "file_size": pc.add(pc.multiply(i, 7), 1000),
            "source_version": version,
        }
    )


def write_committed(root: Path, keys: int, changed: float) -> None:
    """An output of two committed runs, key columns only: all ``keys``, then the changed."""
    from pipeline.manifest import Manifest, RunCounts, RunRecord

    manifest = Manifest.empty()
    for run_id, generation, share in (
        ("20260101T000000Z-aaaaaa", 0, 1.0),
        ("20260102T000000Z-bbbbbb", 1, changed),
    ):
        files = []
        folder = root / "embeddings" / f"run_id={run_id}"
        folder.mkdir(parents=True)
        for n, start in enumerate(range(0, keys, 1_000_000)):
            rows = synthetic_keys(
                start, min(keys, start + 1_000_000), generation=generation, changed=changed
            )
            if share < 1.0:
                step = round(1 / share)
                rows = rows.take(
                    np.flatnonzero(np.arange(start, start + rows.num_rows) % step == 0)
                )
            pq.write_table(
                rows.select(["uri", "file_size", "source_version"]),
                folder / f"part-{n:05d}.parquet",
            )
            files.append(f"embeddings/run_id={run_id}/part-{n:05d}.parquet")
        manifest, _ = manifest.with_run(
            RunRecord(
                run_id=run_id,
                input="s3://bucket/images",
                counts=RunCounts(),
                model=None,
                preprocessing={},
                files={"embeddings": files},
            )
        )
    (root / "_manifest.json").write_bytes(manifest.to_bytes())


def diff_child(root: str, keys: int, changed: float) -> dict[str, Any]:
    """In a fresh process: read the committed keys, index them, diff a listing in the chunks
    a run diffs."""
    from pipeline.incremental import LISTING_BLOCK_ROWS, diff_listing
    from pipeline.listing import ListingCounts
    from pipeline.output import Output
    from pipeline.read import committed_images

    # As pipeline.incremental.list_work does it.
    started = time.perf_counter()
    output = Output(root)
    known = committed_images(output, output.require(output.snapshot()))
    read_s = time.perf_counter() - started
    rows = len(known.current)
    counts = ListingCounts()
    made = [0.0]

    def pages() -> Any:
        for start in range(0, keys, LISTING_BLOCK_ROWS):
            t = time.perf_counter()
            stop = min(keys, start + LISTING_BLOCK_ROWS)
            page = synthetic_keys(start, stop, generation=2, changed=changed)
            counts.listed += page.num_rows
            made[0] += time.perf_counter() - t
            yield page

    new_rows = [0]
    t = time.perf_counter()
    listing = diff_listing(
        pages(),
        counts,
        known=known,
        keep=lambda c: new_rows.__setitem__(0, new_rows[0] + c.num_rows),
    )
    diff_s = time.perf_counter() - t - made[0]
    return {
        "keys": keys,
        "chunk_rows": LISTING_BLOCK_ROWS,
        "committed_rows": rows,
        "read_current_s": round(read_s, 1),
        "diff_s": round(diff_s, 1),
        "total_s": round(read_s + diff_s, 1),
        "new": new_rows[0],
        "unchanged": listing.unchanged,
        "deleted": len(listing.deleted),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def bench_diff(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="scale-diff-") as tmp:
        t = time.perf_counter()
        write_committed(Path(tmp), args.keys, args.changed)
        print(f"committed output written in {time.perf_counter() - t:.0f} s", flush=True)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.scale",
                "_diff_child",
                tmp,
                str(args.keys),
                str(args.changed),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        figures = json.loads(out.stdout.strip().splitlines()[-1])
    expected_new = len(range(0, args.keys, max(1, round(1 / args.changed))))
    assert figures["new"] == expected_new and figures["deleted"] == 0, figures
    return [
        f"- {figures['keys']:,} listed keys against {figures['committed_rows']:,} current rows "
        f"(two committed runs), {args.changed:.0%} changed: {figures['new']:,} new, "
        f"{figures['unchanged']:,} unchanged, {figures['deleted']} deleted",
        f"- read, resolve and index the current keys: {figures['read_current_s']} s; diff "
        f"in {figures['chunk_rows']:,}-key chunks: {figures['diff_s']} s; total "
        f"{figures['total_s']} s",
        f"- driver peak RSS: {figures['peak_rss_gb']} GB",
    ]


class PagedStore:
    """Just enough of s3fs for the lister: a fake bucket answering LIST in pages of 1,000
    entries, each after ``latency`` seconds, with S3's prefix and delimiter semantics.

    It counts requests and the most that were in flight at once.
    """

    def __init__(self, keys: list[str], latency: float = 0.0, bucket: str = "bucket") -> None:
        import fsspec.asyn

        self.keys, self.latency, self.bucket = sorted(keys), latency, bucket
        self.loop = fsspec.asyn.get_loop()
        self.requests = self.in_flight = self.max_in_flight = 0

    def isfile(self, path: str) -> bool:
        return path.partition("/")[2] in self.keys

    def isdir(self, path: str) -> bool:
        return True

    def unstrip_protocol(self, path: str) -> str:
        return f"s3://{path}"

    def _entries(self, prefix: str, delimiter: str) -> Iterator[dict[str, Any]]:
        import bisect

        i = bisect.bisect_left(self.keys, prefix)
        while i < len(self.keys) and self.keys[i].startswith(prefix):
            key = self.keys[i]
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                folder = prefix + rest.split(delimiter, 1)[0]
                yield {"name": f"{self.bucket}/{folder}", "type": "directory", "size": 0}
                i = bisect.bisect_left(self.keys, folder + chr(ord(delimiter) + 1))
                continue
            yield {"name": f"{self.bucket}/{key}", "type": "file", "size": 1, "ETag": f'"{i:x}"'}
            i += 1

    async def _iterdir(
        self, bucket: str, max_items: int | None = None, delimiter: str = "/", prefix: str = ""
    ) -> AsyncIterator[dict[str, Any]]:
        import asyncio

        page: list[dict[str, Any]] = []
        entries = self._entries(prefix, delimiter)
        size = PAGE if max_items is None else min(PAGE, 2 * max_items)  # as s3fs's MaxKeys
        files = 0
        while True:
            page = list(itertools.islice(entries, size))
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.latency)
            finally:
                self.in_flight -= 1
            for entry in page:
                yield entry
                files += entry["type"] == "file"
                if max_items is not None and files >= max_items:
                    return
            if len(page) < size:
                return


def folder_keys(n: int, folders: int, prefix: str = "photos/") -> list[str]:
    """``n`` image keys spread over ``folders`` folders (and one non-image per folder)."""
    keys = [f"{prefix}{i % folders:04d}/{i:09d}.jpg" for i in range(n)]
    return keys + [f"{prefix}{f:04d}/README.txt" for f in range(folders)]


def bench_listing(args: argparse.Namespace) -> list[str]:

    keys = folder_keys(args.keys, args.folders)
    lines = [
        f"- fake store: {args.keys:,} image keys in {args.folders} folders, "
        f"{args.page_latency * 1000:.0f} ms per 1,000-key page"
    ]
    for concurrency in args.concurrency:
        store = PagedStore(keys, args.page_latency)
        rate, seconds = timed_listing(store, "bucket/photos", args.keys, concurrency)
        lines.append(
            f"- concurrency {concurrency}: {rate:,.0f} keys/s ({seconds:.1f} s, "
            f"{store.requests} requests, at most {store.max_in_flight} in flight)"
        )
    return lines


def timed_listing(fs: Any, root: str, keys: int, concurrency: int) -> tuple[float, float]:
    """List every image under ``root`` with the pipeline's lister; (keys/s, seconds)."""
    from pipeline.incremental import LISTING_BLOCK_ROWS
    from pipeline.listing import ListingCounts, list_images

    started = time.perf_counter()
    chunks = list_images(
        fs, root, ListingCounts(), chunk_rows=LISTING_BLOCK_ROWS, concurrency=concurrency
    )
    rows = sum(chunk.num_rows for chunk in chunks)
    seconds = time.perf_counter() - started
    assert rows == keys, (rows, keys)
    return rows / seconds, seconds


@contextlib.contextmanager
def moto_s3() -> Iterator[tuple[Any, str]]:
    """moto's S3 server on a free port of 127.0.0.1 (fake credentials, its request log off),
    with a ``bench`` bucket: ``(s3fs filesystem, endpoint URL)``."""
    import logging
    import os
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        if not fs.exists("bench"):  # moto keeps buckets per process, across servers
            fs.mkdir("bench")
        yield fs, endpoint
    finally:
        server.stop()


def bench_commit(args: argparse.Namespace) -> list[str]:
    """Commit ``--files`` staged files to moto's S3 server: the commit's copies go out
    together; the old way (one move after another) is timed on as many files beside it."""
    from pipeline.commit import commit_run
    from pipeline.manifest import RunCounts, RunRecord
    from pipeline.output import STAGING_DIR, Output

    with moto_s3() as (fs, endpoint):
        data = b"x" * args.file_bytes
        lines = [
            f"- moto S3 on 127.0.0.1, {args.files:,} staged files of {args.file_bytes:,} bytes"
        ]
        for way in ("one by one (before)", "together (now)"):
            run_id = "r-serial" if "before" in way else "r-batch"
            stage = f"bench/out/{STAGING_DIR}/{run_id}"
            fs.pipe({f"{stage}/embeddings/part-{i:05d}.parquet": data for i in range(args.files)})
            staged = {"embeddings": [f"embeddings/part-{i:05d}.parquet" for i in range(args.files)]}
            output = Output("s3://bench/out", {"endpoint_url": endpoint})
            record = RunRecord(
                run_id=run_id, input="", counts=RunCounts(), model=None, preprocessing={}
            )
            started = time.perf_counter()
            if "before" in way:
                for relative in staged["embeddings"]:
                    fs.mv(
                        f"{stage}/{relative}",
                        f"bench/out/embeddings/run_id={run_id}/{relative.rsplit('/', 1)[-1]}",
                    )
            else:
                commit_run(output, output.snapshot(), record, staged=staged)
            seconds = time.perf_counter() - started
            lines.append(f"- {way}: {seconds:.1f} s ({args.files / seconds:,.0f} files/s)")
    return lines


def bench_manifest(args: argparse.Namespace) -> list[str]:
    """The manifest after ``--nights`` nightly runs over ``--images`` images with ``--changed``
    of them new or changed each night, compacted every ``--compact-every`` nights."""
    from pipeline.manifest import COMPACTED, Manifest, RunCounts, RunRecord

    per_file, compact_per_file = 4096, 10_000
    changed = round(args.images * args.changed)

    def files(run_id: str, rows: int, size: int) -> list[str]:
        return [
            f"embeddings/run_id={run_id}/part-{uuid.uuid4().hex}.parquet"
            for _ in range(-(-rows // size))
        ]

    def record(run_id: str, embedded: int, paths: list[str], status: str = "committed") -> Any:
        return RunRecord(
            run_id=run_id,
            input="s3://bucket/photos/",
            counts=RunCounts(
                listed=args.images, unchanged=args.images - embedded, embedded=embedded
            ),
            model=None,
            preprocessing={"mode": "center-crop", "resize_size": 232, "crop_size": 224},
            status=status,  # type: ignore[arg-type]
            files={"embeddings": paths},
        )

    manifest, _ = Manifest.empty().with_run(
        record("20250101T000000Z-full", args.images, files("full", args.images, per_file))
    )
    sizes, seconds = [], []
    for night in range(1, args.nights + 1):
        run_id = f"2025{night:04d}T020000Z-nightly"
        started = time.perf_counter()
        manifest, _ = manifest.with_run(record(run_id, changed, files(run_id, changed, per_file)))
        data = manifest.to_bytes()
        seconds.append(time.perf_counter() - started)
        if args.compact_every and night % args.compact_every == 0:
            compact_id = f"{run_id}-compact"
            manifest, _ = manifest.with_run(
                record(
                    compact_id,
                    args.images,
                    files(compact_id, args.images, compact_per_file),
                    COMPACTED,
                ),
                replace=True,
            )
        sizes.append(len(data))
    return [
        f"- {args.nights} nightly runs over {args.images:,} images, {args.changed:.0%} new or "
        f"changed a night ({changed:,} images, {-(-changed // per_file)} files of {per_file:,} "
        f"rows), compacted every {args.compact_every} nights into files of {compact_per_file:,} rows",
        f"- manifest size: after night 1 {sizes[0] / 1e6:.2f} MB, largest {max(sizes) / 1e6:.2f} "
        f"MB, after night {args.nights} {sizes[-1] / 1e6:.2f} MB ({len(manifest.runs)} run records kept)",
        f"- time to build and serialize it per commit: night 1 {seconds[0] * 1000:.0f} ms, "
        f"night {args.nights} {seconds[-1] * 1000:.0f} ms",
    ]


def bench_local(args: argparse.Namespace) -> list[str]:
    """``--files`` zero-byte images on local disk: a first run, then a second over the same
    input, each as a command (start-up and Ray included), wall time."""
    lines = [f"- {args.files:,} zero-byte .jpg files (each an `empty` error row), local disk"]
    with tempfile.TemporaryDirectory(prefix="scale-local-") as tmp:
        photos = Path(tmp) / "photos"
        for folder in range(-(-args.files // 10_000)):
            (photos / f"{folder:03d}").mkdir(parents=True)
        for i in range(args.files):
            (photos / f"{i // 10_000:03d}" / f"{i:07d}.jpg").touch()
        command = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--input",
            str(photos),
            "--output",
            str(Path(tmp) / "out"),
            "--weights",
            "random",
            "--max-error-rate",
            "1",
        ]
        for name in ("first run", "second run (unchanged input)"):
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            assert done.returncode == 0, done.stderr[-2000:]
            lines.append(f"- {name}: {seconds:.0f} s wall")
    return lines


def bench_input_list(args: argparse.Namespace) -> list[str]:
    """An ``--input-list`` of ``--keys`` URIs into listing chunks: the driver's CPU and the
    wall time, read in the driver and by Ray Data (2 CPUs, a local Ray)."""
    import ray

    from pipeline.feed import read_list
    from pipeline.incremental import LISTING_BLOCK_ROWS as ROWS
    from pipeline.inventory import InputList
    from pipeline.listing import ListingCounts, list_images
    from pipeline.storage import open_fs

    lines = [
        f"- {args.keys:,} URIs under one input prefix, into {ROWS:,}-row listing chunks (the "
        "run's; no diff); local Ray with 2 CPUs for the Ray Data rows",
        "",
        "| list | read by | wall s | keys/s | driver CPU s | driver CPU us/key |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory(prefix="scale-list-") as tmp:
        photos = f"{tmp}/photos"
        uris = pc.binary_join_element_wise(
            f"{photos}/", pc.cast(pa.array(np.arange(args.keys) // 10_000), pa.string()),
            "/", pc.cast(pa.array(np.arange(args.keys)), pa.string()), ".jpg", "",
        )  # fmt: skip
        table = pa.table(
            {
                "uri": uris,
                "size": pa.array(np.full(args.keys, 123_456, np.int64)),
                "version": pc.binary_join_element_wise(
                    "v", pc.cast(pa.array(np.arange(args.keys) % 97), pa.string()), ""
                ),
            }
        )
        pq.write_table(table, f"{tmp}/list.parquet", row_group_size=1_000_000)
        with open(f"{tmp}/list.txt", "w") as f:
            for start in range(0, args.keys, 1_000_000):
                f.write("\n".join(uris[start : start + 1_000_000].to_pylist()) + "\n")
        del table, uris
        fs, root = open_fs(photos)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for name in ("list.parquet", "list.txt"):
                for in_ray in (False, True):
                    counts = ListingCounts()
                    cpu0, t0 = time.process_time(), time.perf_counter()
                    listed = InputList.open(f"{tmp}/{name}", photos)
                    tables = read_list(listed) if in_ray else listed.tables()
                    chunks = sum(
                        1 for _ in list_images(fs, root, counts, chunk_rows=ROWS, tables=tables)
                    )
                    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                    assert counts.listed == args.keys and chunks == -(-args.keys // ROWS)
                    lines.append(
                        f"| {name} | {'Ray Data' if in_ray else 'the driver'} | {wall:.1f} | "
                        f"{args.keys / wall:,.0f} | {cpu:.1f} | {cpu / args.keys * 1e6:.2f} |"
                    )
                    print(lines[-1], flush=True)
        finally:
            ray.shutdown()
    return lines


def bench_first_chunk(args: argparse.Namespace) -> list[str]:
    """How soon the lister has found ``--block-rows`` listing rows (790,000 by default: one
    block at Ray's default of 128 MiB; the plan's 32 MiB blocks hold some 197,000), from a
    ``--keys`` store at ``--page-latency`` per page."""
    from pipeline.listing import ListingCounts, list_images

    keys = folder_keys(args.keys, args.folders)
    store = PagedStore(keys, args.page_latency)
    started = time.perf_counter()
    rows = 0
    for table in list_images(
        store, "bucket/photos", ListingCounts(), chunk_rows=1000, concurrency=16
    ):
        rows += table.num_rows
        if rows >= args.block_rows:
            break
    seconds = time.perf_counter() - started
    return [
        f"- fake store: {args.keys:,} keys in {args.folders:,} folders, "
        f"{args.page_latency * 1000:.0f} ms per page, concurrency 16",
        f"- {rows:,} keys (`--block-rows` {args.block_rows:,}) listed after {seconds:.1f} s",
    ]


def bench_listing_moto(args: argparse.Namespace) -> list[str]:
    """The lister against moto's S3 server (real HTTP, botocore parsing each page in the
    driver): keys/s at concurrency 1 and at the default."""

    with moto_s3() as (fs, _):
        keys = folder_keys(args.keys, args.folders)
        fs.pipe({f"bench/{k}": b"" for k in keys})
        lines = [f"- moto S3 on 127.0.0.1: {args.keys:,} image keys in {args.folders} folders"]
        for concurrency in args.concurrency:
            rate, seconds = timed_listing(fs, "bench/photos", args.keys, concurrency)
            lines.append(f"- concurrency {concurrency}: {rate:,.0f} keys/s ({seconds:.1f} s)")
    return lines


def first_batch_child(keys: int, folders: int, latency: float, work: str) -> None:
    """In a fresh process: a run whose listing comes from a ``PagedStore`` of ``keys`` keys
    (none of them readable here: each becomes an error row, so decode costs nothing); prints
    the seconds from the run's start to the model stage's first batch, then exits."""
    import os
    import threading

    import ray

    from bench.overhead import Identity
    from pipeline import incremental
    from pipeline.config import EmbedConfig
    from pipeline.listing import list_images
    from pipeline.run import execute_run, prepare_run

    marker = Path(work) / "first-batch"
    store = PagedStore(folder_keys(keys, folders), latency)

    def from_store(fs: Any, root: str, counts: Any, **kwargs: Any) -> Any:
        kwargs["concurrency"] = 16
        for chunk in list_images(store, "bucket/photos", counts, **kwargs):
            # Local paths that do not exist: each an `unreadable` row, no credentials needed.
            local = pc.binary_join_element_wise(f"{work}/missing/", chunk["path"], "")
            yield chunk.set_column(0, "uri", local).set_column(1, "path", local)

    class Marking(Identity):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            marker.touch()
            return super().__call__(batch)

    incremental.list_images = from_store  # type: ignore[assignment]
    photos = Path(work) / "photos"
    photos.mkdir()
    config = EmbedConfig(
        input=str(photos), output=str(Path(work) / "out"), weights="random", max_error_rate=1.0
    )

    def start_ray() -> None:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    started = time.perf_counter()
    prepared = prepare_run(config, meanwhile=start_ray)  # as the CLI does: both at once
    ready = time.perf_counter() - started

    def watch() -> None:
        while not marker.exists():
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": round(seconds, 1), "ready": round(ready, 1)}), flush=True)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    execute_run(prepared, embedder=Marking)


def bench_first_batch(args: argparse.Namespace) -> list[str]:
    from pipeline.plan import PLAN_BLOCK_BYTES

    with tempfile.TemporaryDirectory(prefix="scale-first-") as tmp:
        command = [
            sys.executable,
            "-m",
            "bench.scale",
            "_first_batch_child",
            str(args.keys),
            str(args.folders),
            str(args.page_latency),
            tmp,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    return [
        f"- a run (`execute_run`, its own local Ray with 2 CPUs) whose listing is a fake store of "
        f"{args.keys:,} keys in {args.folders:,} folders at {args.page_latency * 1000:.0f} ms a "
        "page, 16 requests in flight, all of them new (nothing committed yet)",
        f"- first batch at the model stage: {figures['seconds']} s after the run started: "
        f"{figures['ready']} s to load the weights and start Ray (overlapped, as the CLI does), "
        f"then the listing until a {PLAN_BLOCK_BYTES // 2**20} MiB block of new images, its "
        "split into decode-sized blocks, and decode",
    ]


def bench_reuse_index(args: argparse.Namespace) -> list[str]:
    from pipeline.reuse import CONTENT_TYPE

    rows_per_file = 4096
    with tempfile.TemporaryDirectory(prefix="scale-reuse-") as tmp:
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        files = []
        for k, start in enumerate(range(0, args.rows, rows_per_file)):
            n = min(rows_per_file, args.rows - start)
            digests = rng.bytes(32 * n)
            md5 = rng.bytes(16 * n).hex()
            table = pa.table(
                {
                    "content_sha256": pa.FixedSizeBinaryArray.from_buffers(
                        CONTENT_TYPE, n, [None, pa.py_buffer(digests)]
                    ),
                    "source_version": [f"etag:{md5[32 * i : 32 * i + 32]}" for i in range(n)],
                    "file_size": np.full(n, 50_000, np.int64),
                }
            )
            path = f"embeddings/run_id=r/part-{k:05d}.parquet"
            (Path(tmp) / path).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, Path(tmp) / path, compression="zstd")
            files.append(path)
        print(f"table written in {time.perf_counter() - started:.0f} s", flush=True)
        (Path(tmp) / "files.json").write_text(json.dumps(files))
        out = subprocess.run(
            [sys.executable, "-m", "bench.scale", "_reuse_index_child", tmp],
            check=True,
            capture_output=True,
            text=True,
        )
        figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["indexed"] == args.rows == figures["etags"], figures
    return [
        f"`python -m bench.scale reuse-index --rows {args.rows}` ({len(files):,} files of "
        f"{rows_per_file:,} rows, local disk)",
        "",
        f"- index built in {figures['seconds']:.1f} s ({figures['seconds'] / args.rows * 1e6:.2f} "
        f"us a row); driver peak RSS {figures['peak_rss'] / 2**30:.2f} GiB; the index "
        f"{figures['bytes'] / 2**20:.0f} MiB ({figures['bytes'] / args.rows:.0f} bytes a row)",
        f"- 4,096 lookups by sha256: {figures['find_ms']:.1f} ms; by ETag: "
        f"{figures['find_etags_ms']:.1f} ms",
    ]


def reuse_index_child(root: str) -> dict[str, Any]:
    """In a fresh process: the content index of the table under ``root``, and lookups."""
    from pipeline.reuse import content_index

    files = json.loads((Path(root) / "files.json").read_text())
    started = time.perf_counter()
    index = content_index(root, files)
    seconds = time.perf_counter() - started
    size = sum(a.nbytes for a in (index.keys, index.file, index.row, index.etags, index.etag_at))
    # Digests the table holds (the index keeps their first 16 bytes), spread over it.
    step = max(1, len(index) // 4096)
    digests = [index.keys[i].tobytes() + bytes(16) for i in range(0, len(index), step)][:4096]
    t = time.perf_counter()
    found = index.find(digests)
    find_ms = (time.perf_counter() - t) * 1e3
    assert (found >= 0).all()
    versions = ["etag:" + bytes(16).hex()] * 4096
    t = time.perf_counter()
    index.find_etags(versions, [50_000] * 4096)
    find_etags_ms = (time.perf_counter() - t) * 1e3
    return {
        "indexed": len(index),
        "etags": len(index.etags),
        "seconds": seconds,
        "bytes": size,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "find_ms": find_ms,
        "find_etags_ms": find_etags_ms,
    }


# Each part of the bench: (its block's title in RESULTS.md, the bench).
PARTS: dict[str, tuple[str, Callable[[argparse.Namespace], list[str]]]] = {
    "diff": ("incremental diff", bench_diff),
    "listing": ("listing an object store", bench_listing),
    "listing-moto": ("listing moto's S3 server", bench_listing_moto),
    "commit": ("commit of staged files", bench_commit),
    "manifest": ("manifest size over a year of nightly runs", bench_manifest),
    "local": ("zero-byte files on local disk, first and second run", bench_local),
    "first-batch": ("time to the first batch at the model stage", bench_first_batch),
    "input-list": ("reading an --input-list", bench_input_list),
    "first-chunk": ("time to the first block of listing rows", bench_first_chunk),
    "reuse-index": ("the index of reuse by content", bench_reuse_index),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_first_batch_child":
        first_batch_child(int(argv[1]), int(argv[2]), float(argv[3]), argv[4])
        return
    if argv and argv[0] == "_reuse_index_child":
        print(json.dumps(reuse_index_child(argv[1])))
        return
    if argv and argv[0] == "_diff_child":
        print(json.dumps(diff_child(argv[1], int(argv[2]), float(argv[3]))))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    sub = parser.add_subparsers(dest="part", required=True)
    diff = sub.add_parser("diff")
    diff.add_argument("--keys", type=int, default=10_000_000)
    diff.add_argument("--changed", type=float, default=0.01)
    listing = sub.add_parser("listing")
    listing.add_argument("--keys", type=int, default=200_000)
    listing.add_argument("--folders", type=int, default=100)
    listing.add_argument("--page-latency", type=float, default=0.1)
    listing.add_argument(
        "--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[1, 16]
    )
    listing.add_argument("--moto", action="store_true", help="list moto's S3 server instead")
    commit = sub.add_parser("commit")
    commit.add_argument("--files", type=int, default=1000)
    commit.add_argument("--file-bytes", type=int, default=1024)
    manifest = sub.add_parser("manifest")
    manifest.add_argument("--images", type=int, default=10_000_000)
    manifest.add_argument("--changed", type=float, default=0.01)
    manifest.add_argument("--nights", type=int, default=365)
    manifest.add_argument("--compact-every", type=int, default=7)
    local = sub.add_parser("local")
    local.add_argument("--files", type=int, default=200_000)
    # The first-chunk and first-batch parts list the same kind of fake store.
    big_store = argparse.ArgumentParser(add_help=False)
    big_store.add_argument("--keys", type=int, default=10_000_000)
    big_store.add_argument("--folders", type=int, default=10_000)
    big_store.add_argument("--page-latency", type=float, default=0.1)
    first = sub.add_parser("first-chunk", parents=[big_store])
    first.add_argument("--block-rows", type=int, default=790_000)
    sub.add_parser("first-batch", parents=[big_store])
    input_list = sub.add_parser("input-list")
    input_list.add_argument("--keys", type=int, default=10_000_000)
    reuse_index = sub.add_parser("reuse-index")
    reuse_index.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args(argv)
    part = "listing-moto" if args.part == "listing" and args.moto else args.part
    title, bench = PARTS[part]
    append(f"Scale: {title}", bench(args))


if __name__ == "__main__":
    main()
