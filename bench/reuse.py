"""Reuse by content: images moved to new keys, then the run again.

python -m bench.reuse --images 10000 --store local
python -m bench.reuse --images 10000 --store s3

Writes ``--images`` photo-like JPEGs (500 x 375) under ``photos/a/``, on local disk or on a
moto S3 server that this process runs (wrapped to count the bytes each GET returns), and runs
``embed-images run`` (seeded random weights) into a fresh output. Then every image moves to
``photos/b/`` (a rename on local disk; on S3 a server-side copy, which keeps a single-part
ETag, and a delete), and the same command runs again. Reported per run: wall time, images
the model ran on (embedded minus reused), and on S3 the bytes GETs returned from the images
and from the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.corpus import make_corpus
from bench.results import append
from pipeline.read import read_manifest


class CountingServer:
    """moto's S3 app on 127.0.0.1, counting the bytes of GET responses by key prefix."""

    def __init__(self, port: int) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.app = DomainDispatcherApplication(create_backend_app)
        self.read: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = make_server("127.0.0.1", port, self._counted, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def _counted(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        body = self.app(environ, start_response)
        if environ["REQUEST_METHOD"] != "GET" or environ.get("QUERY_STRING", "").startswith("list"):
            return body
        chunks = list(body)
        parts = environ["PATH_INFO"].strip("/").split("/")
        prefix = "/".join(parts[1:3]) if len(parts) > 2 else "/".join(parts)
        with self.lock:
            self.read[prefix] = self.read.get(prefix, 0) + sum(len(c) for c in chunks)
        return chunks

    def take(self) -> dict[str, int]:
        with self.lock:
            read, self.read = self.read, {}
        return read


def run(photos: str, output: str, env: dict[str, str], args: list[str]) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "pipeline.cli", "run", "--input", photos, "--output", output,
        "--weights", "random", "--progress", "none", *args,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    options = {"endpoint_url": env["ENDPOINT"]} if "ENDPOINT" in env else {}
    record = read_manifest(output, storage_options=options).runs[-1]  # type: ignore[union-attr]
    counts = record.counts
    return {
        "wall": wall,
        "embedded": counts.embedded,
        "reused": counts.reused,
        "model": counts.embedded - counts.reused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--reuse", choices=("etag", "sha256"), default="etag")
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--no-record", action="store_true", help="print, do not append")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-reuse-"))
    env = dict(os.environ)
    extra = ["--reuse", args.reuse]
    server = None
    try:
        made = time.perf_counter()
        make_corpus("small", work / "photos" / "a", count=args.images)
        print(f"wrote {args.images} images in {time.perf_counter() - made:.0f} s", flush=True)
        if args.store == "local":
            photos, output = str(work / "photos"), str(work / "out")
        else:
            import boto3

            server = CountingServer(args.port)
            env |= {
                "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1", "ENDPOINT": server.endpoint,
            }  # fmt: skip
            os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
            s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket="bench")
            for path in sorted((work / "photos" / "a").iterdir()):
                s3.upload_file(str(path), "bench", f"photos/a/{path.name}")
            photos, output = "s3://bench/photos", "s3://bench/out"
            extra += ["--endpoint-url", server.endpoint]
            server.take()
        first = run(photos, output, env, extra)
        first["read"] = server.take() if server else {}
        print(f"first run: {first}", flush=True)
        moved = time.perf_counter()
        if server is None:
            (work / "photos" / "a").rename(work / "photos" / "b")
        else:
            for path in sorted((work / "photos" / "a").iterdir()):
                key = f"photos/a/{path.name}"
                s3.copy_object(
                    Bucket="bench",
                    Key=key.replace("/a/", "/b/"),
                    CopySource={"Bucket": "bench", "Key": key},
                )
                s3.delete_object(Bucket="bench", Key=key)
            server.take()
        print(f"moved {args.images} images in {time.perf_counter() - moved:.0f} s", flush=True)
        again = run(photos, output, env, extra)
        again["read"] = server.take() if server else {}
        print(f"after the move: {again}", flush=True)
    finally:
        if server is not None:
            server.server.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    def read(result: dict[str, Any]) -> str:
        if not result["read"]:
            return ""
        images = result["read"].get("photos/a", 0) + result["read"].get("photos/b", 0)
        table = sum(v for k, v in result["read"].items() if k.startswith("out/"))
        return f"; S3 GETs returned {images / 2**20:.1f} MiB of images, {table / 2**20:.1f} MiB of table"

    lines = [
        f"`python -m bench.reuse --images {args.images} --store {args.store} --reuse {args.reuse}`",
        "",
        f"- first run: {first['wall']:.0f} s wall, the model ran on {first['model']:,} images"
        + read(first),
        f"- after moving every image to new keys: {again['wall']:.0f} s wall, "
        f"{again['reused']:,} of {again['embedded']:,} reused, the model ran on "
        f"{again['model']:,} images" + read(again),
    ]
    print("\n".join(lines))
    if not args.no_record:
        append(f"Reuse by content: {args.images:,} moved images, {args.store}", lines)


if __name__ == "__main__":
    main()
