"""S3 throttling and resets: a fault-injecting proxy in front of moto, as a flaky store would be."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run_args

from pipeline.cli import main
from pipeline.read import read_embeddings, read_manifest

pytestmark = pytest.mark.slow

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyProxy:
    """Forwards to moto; every ``slowdown_every``-th request gets a 503 SlowDown and every
    ``drop_every``-th a dropped connection, up to ``max_faults`` in all, or every request fails
    while ``outage`` is set."""

    def __init__(
        self, upstream: str, *, slowdown_every: int = 0, drop_every: int = 0, max_faults: int = 0
    ):
        self.upstream = upstream.removeprefix("http://")
        self.slowdown_every, self.drop_every, self.max_faults = (
            slowdown_every,
            drop_every,
            max_faults,
        )
        self.outage = False
        self.outage_on = ""  # a sustained outage begins with the first GET of a matching path
        # A long burst of SlowDowns on the first ``throttled`` requests of ``throttle_method``
        # whose path holds ``throttle_on``.
        self.throttle_method, self.throttle_on, self.throttled = "PUT", "", 0
        self.requests = self.slowdowns = self.drops = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.outage_on and self.command == "GET" and proxy.outage_on in self.path:
                    proxy.outage = True
                fault = proxy._fault()
                if fault is None and proxy._throttle(self.command, self.path):
                    fault = "slowdown"
                if fault == "drop":
                    self.close_connection = True  # no response at all: a reset connection
                    return
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                # The proxy holds the whole body: no 100-continue handshake upstream.
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("transfer-encoding", "expect")
                }
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in (
                        "transfer-encoding",
                        "content-length",
                        "connection",
                        "date",
                        "server",
                    ):
                        self.send_header(key, value)
                # A HEAD answer has no body but must keep the object's length.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            n = self.requests
            if self.outage:
                self.slowdowns += 1
                return "slowdown"
            if self.slowdowns + self.drops >= self.max_faults:
                return None
            if self.drop_every and n % self.drop_every == 0:
                self.drops += 1
                return "drop"
            if self.slowdown_every and n % self.slowdown_every == 0:
                self.slowdowns += 1
                return "slowdown"
            return None

    def _throttle(self, method: str, path: str) -> bool:
        with self.lock:
            if (
                method == self.throttle_method
                and self.throttle_on
                and self.throttle_on in path
                and self.throttled > 0
            ):
                self.throttled -= 1
                self.slowdowns += 1
                return True
            return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(s3_endpoint) -> Iterator[FaultyProxy]:  # type: ignore[no-untyped-def]
    faulty = FaultyProxy(s3_endpoint, slowdown_every=4, drop_every=11, max_faults=40)
    yield faulty
    faulty.close()


def _upload(s3, bucket: str, make_image, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    uris = []
    for i in range(n):
        s3.pipe(f"{bucket}/photos/p{i}.jpg", make_image((40 + i, 30), seed=i))
        uris.append(f"s3://{bucket}/photos/p{i}.jpg")
    return uris


def _run_through(proxy: FaultyProxy, bucket: str, *extra: str) -> int:
    """`embed-images run` from s3://BUCKET/photos/ to s3://BUCKET/out through the proxy."""
    return main(
        run_args(
            f"s3://{bucket}/photos/", f"s3://{bucket}/out", "--endpoint-url", proxy.url, *extra
        )
    )


def test_bursts_of_slowdown_and_resets_are_retried(
    proxy, s3_bucket, make_image, ray_session
) -> None:  # type: ignore[no-untyped-def]
    s3, bucket = s3_bucket
    uris = _upload(s3, bucket, make_image, 6)
    output = f"s3://{bucket}/out"
    status = _run_through(proxy, bucket, "--batch-size", "3", "--decode-batch-size", "2")
    assert status == 0
    assert proxy.slowdowns >= 5 and proxy.drops >= 1, (proxy.slowdowns, proxy.drops)
    options = {"endpoint_url": s3.client_kwargs.get("endpoint_url") or s3.endpoint_url}
    table = read_embeddings(output, storage_options=options)
    assert sorted(table["uri"].to_pylist()) == uris  # every image once, no error rows
    assert read_embeddings(output, storage_options=options, table="errors").num_rows == 0


# A hang guard, not a speed check: each layer's retries are bounded, so the run must stop.
@pytest.mark.timeout(300)
def test_a_sustained_outage_fails_with_no_commit(
    proxy, s3_bucket, make_image, ray_session, capsys
) -> None:  # type: ignore[no-untyped-def]
    s3, bucket = s3_bucket
    _upload(s3, bucket, make_image, 2)
    proxy.outage = True
    status = _run_through(proxy, bucket)
    assert status == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("embed-images: error: storage error on s3://"), last
    assert "Service Unavailable" in last, last
    proxy.outage = False
    assert read_manifest(f"s3://{bucket}/out", storage_options={"endpoint_url": proxy.url}) is None


@pytest.mark.timeout(300)  # a hang guard: s3fs/botocore retries, then Ray Data's, then stop
def test_an_outage_that_starts_mid_run_commits_nothing(
    proxy, s3_bucket, make_image, ray_session, capsys
) -> None:  # type: ignore[no-untyped-def]
    s3, bucket = s3_bucket
    _upload(s3, bucket, make_image, 2)
    proxy.max_faults = 0  # no bursts: only the outage
    # The checks and the listing pass; the outage begins when a worker first fetches an image.
    proxy.outage_on = f"/{bucket}/photos/p"
    status = _run_through(proxy, bucket)
    assert status != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("embed-images: error: the pipeline failed, nothing committed: "), last
    # The store's own words (its error code or message), not Ray's wrapper text.
    store_words = ("SlowDown", "Please reduce your request rate", "Service Unavailable")
    assert any(words in last for words in store_words), last
    proxy.outage_on, proxy.outage = "", False
    assert read_manifest(f"s3://{bucket}/out", storage_options={"endpoint_url": proxy.url}) is None


def test_throttled_writes_outlasting_botocore_retries_are_retried_by_ray_data(
    proxy, s3_bucket, make_image, ray_session
) -> None:  # type: ignore[no-untyped-def]
    """botocore gives up after 5 attempts; Ray Data retries the write task only because
    "Please reduce your request rate" is among its retried I/O errors (pipeline.plan)."""
    s3, bucket = s3_bucket
    uris = _upload(s3, bucket, make_image, 3)
    proxy.max_faults = 0
    proxy.throttle_on, proxy.throttled = "/_staging/", 30  # more than s3fs x botocore retries
    output = f"s3://{bucket}/out"
    status = _run_through(proxy, bucket)
    assert status == 0
    assert proxy.throttled == 0  # the whole burst was served
    table = read_embeddings(output, storage_options={"endpoint_url": proxy.url})
    assert sorted(table["uri"].to_pylist()) == uris


def test_throttled_reads_outlasting_client_retries_are_retried_by_ray_data(
    proxy, s3_bucket, make_image, ray_session
) -> None:  # type: ignore[no-untyped-def]
    """A read that fails for a passing reason after the client's retries fails its decode
    task, which Ray Data runs again, instead of making the images `unreadable` rows."""
    s3, bucket = s3_bucket
    uris = _upload(s3, bucket, make_image, 2)
    proxy.max_faults = 0
    # One botocore attempt per s3fs try: each fetch gives up after s3fs's 5 tries. 14 SlowDowns
    # on the image GETs outlast the first decode attempt (2 x 5) but not the second.
    proxy.throttle_method, proxy.throttle_on, proxy.throttled = "GET", f"/{bucket}/photos/p", 14
    options = '{"config_kwargs": {"retries": {"total_max_attempts": 1}}}'
    status = _run_through(proxy, bucket, "--storage-options", options)
    assert status == 0
    assert proxy.throttled == 0  # the whole burst was served
    read_options = {"endpoint_url": proxy.url}
    table = read_embeddings(f"s3://{bucket}/out", storage_options=read_options)
    assert sorted(table["uri"].to_pylist()) == uris
    assert (
        read_embeddings(f"s3://{bucket}/out", storage_options=read_options, table="errors").num_rows
        == 0
    )
