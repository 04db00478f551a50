"""Nothing lost when two processes meet, nothing mixed, nothing leaked (issue 23).

Each test names the case of the issue it covers; each failed on the main it was written
against. The output's guarantees are the README's "Guarantees" section.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from conftest import kill_stalled_driver, run_args, stage_rows

from bench.overhead import Identity
from pipeline.cli import main
from pipeline.commit import commit_run
from pipeline.config import EmbedConfig
from pipeline.embed import ModelIdentity
from pipeline.manifest import RunCounts, RunRecord
from pipeline.output import Output
from pipeline.read import read_embeddings, read_manifest
from pipeline.run import execute_run, prepare_run
from pipeline.storage import make_parent

MODEL = ModelIdentity(
    weights="random:seed=0", weights_sha256="00" * 32, normalized=False, precision="fp32"
)


def _record(run_id: str, **changes: Any) -> RunRecord:
    record = RunRecord(
        run_id=run_id, input="/x", counts=RunCounts(listed=1), model=MODEL, preprocessing={}
    )
    return dataclasses.replace(record, **changes)


_stage = stage_rows


def _commit(output: str, run_id: str, uris: list[str], options: Any = None, **kw: Any) -> None:
    out = Output(output, options)
    commit_run(
        out, out.snapshot(), _record(run_id), staged=_stage(output, run_id, uris, options), **kw
    )


def _write(folder: Path, name: str, data: bytes) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -- case 1: a starting run's clean-up and another process's commit -------------------------


@pytest.mark.slow
def test_case_01_a_commit_landing_before_a_runs_cleanup_survives_it(
    output_uri, tmp_path, make_image, ray_session, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A compaction (or another run) commits between a run's snapshot and its start-up
    clean-up: none of its files may go, every reader keeps working, and the late run is
    refused at its commit."""
    from pipeline.compact import compact
    from pipeline.sink import RunSink

    output, options = output_uri
    photos = tmp_path / "photos"
    for i in range(3):
        _write(photos, f"p{i}.jpg", make_image((24, 20), seed=i))
    config = EmbedConfig(input=str(photos), output=output, weights="random", **_s3(options))
    execute_run(prepare_run(config), embedder=Identity)
    _write(photos, "p3.jpg", make_image((24, 20), seed=3))

    real_start = RunSink.start

    def compaction_meanwhile(self: RunSink) -> None:
        compact(output, storage_options=options)  # another process, in the window
        real_start(self)

    monkeypatch.setattr(RunSink, "start", compaction_meanwhile)
    with pytest.raises(Exception, match="another run committed"):
        execute_run(prepare_run(config), embedder=Identity)
    manifest = read_manifest(output, storage_options=options)
    assert manifest is not None and manifest.runs[-1].status == "compacted"
    out = Output(output, options)
    for path in manifest.listed_paths():
        assert out.fs.exists(f"{out.root}/{path}"), path
    table = read_embeddings(output, storage_options=options)
    assert sorted(Path(u).name for u in table["uri"].to_pylist()) == ["p0.jpg", "p1.jpg", "p2.jpg"]


def test_case_01_the_cleanup_spares_listed_young_and_live_files(output_uri) -> None:  # type: ignore[no-untyped-def]
    """The rule: delete only files no fresh manifest lists, older than the retention, outside
    live runs' folders."""
    output, options = output_uri
    out = Output(output, options)
    stale = out.snapshot()  # before anything: a clean-up that trusted it would delete all
    _commit(output, "r1", ["/a.png"], options)
    _stage(output, "dead", ["/b.png"], options)  # a killed run's staging
    young = f"{out.root}/embeddings/run_id=young/part-0.parquet"
    make_parent(out.fs, young)
    out.fs.pipe_file(young, b"moved a moment ago, manifest not yet written")
    with out.lease("alive"):
        _stage(output, "alive", ["/c.png"], options)
        assert stale.manifest is None
        assert out.remove_orphans() == 0  # everything is listed, young, or alive
        time.sleep(1.1)  # object stores stamp whole seconds
        removed = out.remove_orphans(retention=0)
        assert removed == 2  # the dead run's staged file, the unlisted moved one
        assert not out.fs.exists(young)
        staged = out.fs.find(f"{out.root}/_staging/alive")
        assert any(p.endswith(".parquet") for p in staged), staged  # a live run's: untouched
    assert read_embeddings(output, storage_options=options)["uri"].to_pylist() == ["/a.png"]


# -- case 2: --full with other weights --------------------------------------------------------


@pytest.mark.slow
def test_case_02_a_full_run_with_other_weights_is_current_all_at_once_and_resumes(
    tmp_path, ray_session
) -> None:  # type: ignore[no-untyped-def]
    photos, output = tmp_path / "photos", str(tmp_path / "out")
    photos.mkdir()
    for i in range(12):
        (photos / f"{i:02d}.jpg").write_bytes(b"")  # an error row each: no decode needed
    base = dict(input=str(photos), output=output, weights="random", max_error_rate=1.0)
    execute_run(prepare_run(EmbedConfig(**base)), embedder=Identity)
    old = read_manifest(output)
    assert old is not None and old.model is not None

    small = dict(batch_size=4, decode_batch_size=4, rows_per_file=4, commit_every=4)
    other = dict(base, seed=1, full=True, **small)

    def checkpointed() -> bool:
        manifest = read_manifest(output)
        return manifest is not None and manifest.pending is not None

    # The --full run is SIGKILLed once it has committed checkpoints, with work left.
    kill_stalled_driver(
        tmp_path, other, stage="bench.overhead:Identity", stall_after=2, ready=checkpointed
    )
    manifest = read_manifest(output)
    assert manifest is not None and manifest.pending is not None
    assert manifest.model == old.model  # the table is still all of the old model
    assert manifest.current == old.current
    assert sorted(read_embeddings(output, table="errors")["run_id"].unique().to_pylist()) == [
        old.runs[0].run_id
    ]
    # The same --full run again resumes the pending files, then replaces the table at once.
    pending = sum(len(p) for p in manifest.pending.files.values())
    record = execute_run(prepare_run(EmbedConfig(**other)), embedder=Identity)
    assert record.counts.failed < 12 and pending > 0  # what the killed run kept, not redone
    done = read_manifest(output)
    assert done is not None and done.pending is None
    assert done.model is not None and done.model.weights == "random:seed=1"
    errors = read_embeddings(output, table="errors")
    assert errors.num_rows == 12 and errors["uri"].unique().to_pylist() == errors["uri"].to_pylist()
    # --full --limit adds to the table without replacing it: other weights are refused.
    status = main(run_args(photos, output) + ["--seed", "2", "--full", "--limit", "3"])
    assert status == 2


# -- case 3: each URI once ----------------------------------------------------------------


def test_case_03_an_input_list_naming_a_uri_twice_embeds_it_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import fsspec

    from pipeline.incremental import list_new_images
    from pipeline.inventory import list_tables

    photos = tmp_path / "photos"
    for name in ("a.jpg", "b.jpg"):
        _write(photos, name, b"x")
    listing = tmp_path / "list.txt"
    a, b = photos / "a.jpg", photos / "b.jpg"
    listing.write_text(f"{a}\n{b}\n{a}\n{a}\n")
    kept: list[pa.Table] = []
    new = list_new_images(
        fsspec.filesystem("file"),
        str(photos),
        known=None,
        keep=kept.append,
        tables=list_tables(str(listing), str(photos), {}),
    )
    uris = [u for t in kept for u in t["uri"].to_pylist()]
    assert sorted(uris) == [str(a), str(b)] and new.to_embed == 2
    assert new.counts.duplicates == 2


def test_case_03_an_inventory_of_all_versions_lists_the_latest_live_version(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.inventory import ListFile, _batches, _inventory_rows

    rows = [
        ("b", "photos/a.jpg", "10", "e-old", "false", "false"),
        ("b", "photos/a.jpg", "11", "e-new", "true", "false"),
        ("b", "photos/gone.jpg", "", "", "true", "true"),  # a delete marker: empty Size
        ("b", "photos/gone.jpg", "12", "e-g", "false", "false"),
    ]
    data = "".join(",".join(f'"{v}"' for v in row) + "\n" for row in rows)
    path = tmp_path / "part.csv.gz"
    path.write_bytes(gzip.compress(data.encode()))
    names = ("Bucket", "Key", "Size", "ETag", "IsLatest", "IsDeleteMarker")
    entry = ListFile(str(path), "csv", inventory=True, csv_columns=names, compression="gzip")
    import fsspec

    tables = [
        _inventory_rows(b, url_encoded=True)
        for b in _batches(fsspec.filesystem("file"), str(path), entry)
    ]
    listed = pa.concat_tables(tables).to_pylist()
    assert listed == [
        {"uri": "s3://b/photos/a.jpg", "file_size": 11, "source_version": "etag:e-new"}
    ]


def test_case_03_the_reader_keeps_one_row_per_uri_even_with_one_run(output_uri) -> None:  # type: ignore[no-untyped-def]
    output, options = output_uri
    _commit(output, "r1", ["/a.png", "/b.png", "/a.png"], options)
    uris = read_embeddings(output, storage_options=options)["uri"].to_pylist()
    assert sorted(uris) == ["/a.png", "/b.png"]


# -- case 4: no credential in anything written or printed ---------------------------------


@pytest.mark.slow
def test_case_04_no_canary_credential_reaches_the_output_or_the_console(
    tmp_path, make_image, random_checkpoint, ray_session, capsys
) -> None:  # type: ignore[no-untyped-def]
    import http.server

    served = random_checkpoint.read_bytes()

    class Weights(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(served)))
            self.end_headers()
            self.wfile.write(served)

        def do_HEAD(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(served)))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Weights)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    photos, output = tmp_path / "photos", tmp_path / "out"
    _write(photos, "a.jpg", make_image((24, 20)))
    url = (
        f"http://127.0.0.1:{server.server_port}/w.pth"
        "?X-Amz-Security-Token=CANARYTOKEN1&X-Amz-Signature=CANARYSIG2"
    )
    secrets = {
        "account_key": "CANARYKEY3",
        "sas_token": "CANARYSAS4",
        "client_secret": "CANARYCS5",
        "connection_string": "CANARYCONN6",
    }
    try:
        status = main(
            run_args(photos, output, weights=url) + ["--storage-options", json.dumps(secrets), "-v"]
        )
    finally:
        server.shutdown()
    assert status == 0
    printed = capsys.readouterr()
    for path in output.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"CANARY" not in data, path
    assert "CANARY" not in printed.out + printed.err
    manifest = read_manifest(str(output))
    assert manifest is not None and manifest.model is not None
    assert manifest.model.weights == f"http://127.0.0.1:{server.server_port}/w.pth"


def test_case_04_storage_options_are_masked_by_pattern() -> None:
    from pipeline.report import config_for_report
    from pipeline.storage import public_url

    config = EmbedConfig(
        input="s3://b/in",
        output="s3://b/out",
        weights="https://h/w.pth?sig=SECRETSIG",
        storage_options={
            "account_key": "K",
            "client_kwargs": {"aws_session_token": "T", "region_name": "eu"},
            "anon": False,
        },
        endpoint_url="https://user:SECRETPW@minio:9000",
    )
    shown = json.dumps(config_for_report(config))
    assert "SECRET" not in shown and '"K"' not in shown and '"T"' not in shown
    assert '"region_name": "eu"' in shown
    assert public_url("https://user:pw@minio:9000/x?y=1#z") == "https://minio:9000/x"


# -- case 5: a tampered manifest deletes nothing outside the output ------------------------


@pytest.mark.parametrize(
    "path", ["../victim.txt", "embeddings/../../victim.txt", "/etc/passwd", "embeddings//x"]
)
def test_case_05_a_manifest_path_outside_the_tables_is_refused_before_anything(
    tmp_path, path, capsys
) -> None:  # type: ignore[no-untyped-def]
    output = str(tmp_path / "out")
    _commit(output, "r1", ["/a.png"])
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    manifest["current"]["embeddings"].append(path)
    (tmp_path / "out" / "_manifest.json").write_text(json.dumps(manifest))
    photos = tmp_path / "photos"
    _write(photos, "a.jpg", b"")
    status = main(run_args(photos, output) + ["--full"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a file under its embeddings" in err[0], err
    assert victim.read_text() == "keep me"


# -- case 6: the verdict is the run's -------------------------------------------------------


@pytest.mark.slow
def test_case_06_the_verdict_does_not_depend_on_checkpoints_or_order(
    tmp_path, make_image, ray_session
) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    for i in range(4):
        _write(photos, f"a-bad-{i}.jpg", b"")  # sorted first: the first checkpoint is all bad
    for i in range(12):
        _write(photos, f"b-good-{i:02d}.jpg", make_image((20, 16), seed=i))
    statuses = []
    for name, small in (("no checkpoints", {}), ("checkpoints", {"commit_every": 8})):
        config = EmbedConfig(
            input=str(photos),
            output=str(tmp_path / name),
            weights="random",
            max_error_rate=0.3,  # 4 of 16 is 25 %
            batch_size=8,
            decode_batch_size=8,
            rows_per_file=8,
            **small,
        )
        record = execute_run(prepare_run(config), embedder=Identity)
        statuses.append((record.status, record.counts.embedded, record.counts.failed))
    assert statuses == [("committed", 12, 4)] * 2


# -- case 7: a file name that is not UTF-8 ---------------------------------------------------


@pytest.mark.slow
def test_case_07_a_name_that_is_not_utf8_is_an_error_row(
    tmp_path, make_image, ray_session, capsys
) -> None:  # type: ignore[no-untyped-def]
    photos, output = tmp_path / "photos", tmp_path / "out"
    _write(photos, "good.jpg", make_image((24, 20)))
    with open(os.path.join(os.fsencode(photos), b"caf\xe9.jpg"), "wb") as f:
        f.write(make_image((24, 20), seed=1))
    args = run_args(photos, output)
    args += ["--max-error-rate", "1"]
    assert main([*args, "--dry-run"]) == 0
    assert main(args) == 0
    errors = read_embeddings(str(output), table="errors").to_pylist()
    assert [(e["uri"], e["error_type"]) for e in errors] == [
        (f"{photos}/caf%E9.jpg", "bad_file_name")
    ]
    assert "rename the file" in errors[0]["error_message"]
    assert main(args) == 0  # the next run: a known failure, not retried
    capsys.readouterr()


# -- case 8: commit order, not run ids --------------------------------------------------------


def test_case_08_the_last_commit_wins_whatever_the_run_ids(output_uri) -> None:  # type: ignore[no-untyped-def]
    output, options = output_uri
    out = Output(output, options)
    # A run of today, then a backfill of an earlier day: its id sorts first, it committed last.
    commit_run(
        out,
        out.snapshot(),
        _record("20261205T020000Z-nightly"),
        staged=_stage(output, "20261205T020000Z-nightly", ["/a.png"], options, version="old"),
    )
    commit_run(
        out,
        out.snapshot(),
        _record("20261101T020000Z-nightly"),
        staged=_stage(output, "20261101T020000Z-nightly", ["/a.png"], options, version="new"),
    )
    table = read_embeddings(output, storage_options=options)
    assert table["source_version"].to_pylist() == ["new"]


# -- cases 9 and 10: the manifest itself -----------------------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'{"format": "embed-images/manifest", "versi', "is not valid JSON"),
        (b"[1, 2]", "is not an embed-images manifest"),
        (b'{"hello": "world"}', "is not an embed-images manifest"),
        (b'{"format": "embed-images/manifest", "version": 99}', "written by a newer embed-images"),
        (b'{"format": "embed-images/manifest", "version": 1, "current": 3}', "not a valid"),
    ],
)
def test_case_09_a_bad_manifest_is_one_line_and_exit_2(tmp_path, content, says, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "_manifest.json").write_bytes(content)
    photos = tmp_path / "photos"
    _write(photos, "a.jpg", b"")
    for args in (
        ["status", str(out)],
        run_args(photos, out),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and "_manifest.json" in err[0], err
    assert (out / "_manifest.json").read_bytes() == content  # never rewritten


def test_case_10_the_manifest_follows_the_umask(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old = os.umask(0o022)
    try:
        _commit(str(tmp_path / "out"), "r1", ["/a.png"])
    finally:
        os.umask(old)
    mode = (tmp_path / "out" / "_manifest.json").stat().st_mode & 0o777
    table_file = next((tmp_path / "out" / "embeddings").rglob("*.parquet"))
    assert mode == 0o644 == table_file.stat().st_mode & 0o777


# -- case 11: an endpoint that never answers --------------------------------------------------


def test_case_11_an_endpoint_that_never_answers_fails_in_bounded_time(
    tmp_path, aws_credentials, capsys
) -> None:  # type: ignore[no-untyped-def]
    from pipeline.storage import S3_CONFIG, open_fs

    # By default: s3fs's tries x botocore's attempts x the read time-out stay under 2 minutes.
    fs, _ = open_fs("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:9"})
    assert fs.config_kwargs["read_timeout"] == S3_CONFIG["read_timeout"]
    attempts = S3_CONFIG["retries"]["max_attempts"]  # type: ignore[index]
    assert fs.retries * attempts * S3_CONFIG["read_timeout"] + S3_CONFIG["connect_timeout"] <= 120
    # A server that accepts and never answers, with time-outs of 1 s: the command fails in
    # one line, within seconds, and says it retried on the way.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    port = silent.getsockname()[1]
    options = {"config_kwargs": {"connect_timeout": 1, "read_timeout": 1}}
    started = time.time()
    try:
        status = main(
            ["run", "--input", "s3://bucket/photos", "--output", str(tmp_path / "out")]
            + ["--endpoint-url", f"http://127.0.0.1:{port}"]
            + ["--storage-options", json.dumps(options), "--weights", "random"]
        )
    finally:
        silent.close()
    elapsed = time.time() - started
    assert status == 1 and elapsed < 60, (status, elapsed)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("embed-images: error: ") and "s3://bucket/photos" in err[-1]
    assert any("retrying" in line for line in err[:-1]), err


# -- case 12: paths are compared as real paths ------------------------------------------------


def test_case_12_inside_and_outside_are_decided_on_real_paths(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from pipeline.inventory import list_tables

    photos = tmp_path / "in"
    _write(photos, "a.jpg", b"x")
    _write(tmp_path / "outside", "x.jpg", b"x")
    link = tmp_path / "link"
    link.symlink_to(photos)
    status = main(
        ["run", "--input", str(photos), "--output", str(link / "out")] + ["--weights", "random"]
    )
    assert status == 2
    assert "is inside input" in capsys.readouterr().err
    entries = tmp_path / "list.txt"
    entries.write_text(f"{photos}/a.jpg\n{photos}/../outside/x.jpg\n")
    uris = [
        u
        for t in list_tables(str(entries), str(photos), {})
        for u, image in zip(t["uri"].to_pylist(), t["image"].to_pylist(), strict=True)
        if image
    ]
    assert uris == [f"{photos}/a.jpg"]


# -- case 13: --commit-every is honoured -----------------------------------------------------


@pytest.mark.slow
def test_case_13_commit_every_is_honoured_whatever_rows_per_file(tmp_path, ray_session) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(480):
        (photos / f"{i:04d}.jpg").write_bytes(b"")
    config = EmbedConfig(
        input=str(photos),
        output=str(tmp_path / "out"),
        weights="random",
        max_error_rate=1.0,
        commit_every=96,  # rows_per_file stays 4096
    )
    record = execute_run(prepare_run(config), embedder=Identity)
    assert record.counts.failed == 480
    assert record.checkpoints >= 4, record.checkpoints


# -- case 14: one error path for every entry point ----------------------------------------------


def test_case_14_the_nightly_job_reports_an_io_error_in_one_line(
    tmp_path, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    from jobs.nightly import main as nightly

    def denied(self: Output) -> None:
        raise PermissionError(13, "Permission denied", f"{self.root}/_manifest.json")

    monkeypatch.setattr(Output, "snapshot", denied)
    (tmp_path / "in").mkdir()
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    args += ["--weights", "random"]
    assert nightly(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embed-images: error: ") and "Permission" in err[0]
    assert main(["run", *args]) == 1
    assert capsys.readouterr().err.strip().splitlines() == err


# -- case 15: old bad files do not fail every later night ------------------------------------


@pytest.mark.slow
def test_case_15_failures_an_earlier_run_accepted_never_count_again(
    tmp_path, make_image, ray_session, capsys
) -> None:  # type: ignore[no-untyped-def]
    from pipeline import embed_images

    photos, output = tmp_path / "photos", str(tmp_path / "out")
    for i in range(27):
        _write(photos, f"g{i:02d}.jpg", make_image((16, 12), seed=i))
    for i in range(3):
        _write(photos, f"bad{i}.jpg", b"not an image")
    args = run_args(photos, output)
    assert main(args) == 0  # 3 of 30: 10 %, within the default limit
    assert main([*args, "--dry-run"]) == 0
    assert "would exit 3" not in capsys.readouterr().out
    assert main(args) == 0  # nothing new: the accepted failures do not count
    for i in range(6):
        _write(photos, f"n{i}.jpg", make_image((16, 12), seed=100 + i))
    run = embed_images(input=str(photos), output=output, weights="random")
    assert run.counts.embedded == 6 and run.counts.known_failed == 3
    # A refused run's failures go on counting: exit 3 again, and the dry run says so.
    for i in range(2):
        _write(photos, f"worse{i}.jpg", b"")
    assert main([*args, "--max-error-rate", "0.05"]) == 3
    assert main([*args, "--max-error-rate", "0.05"]) == 3
    assert main([*args, "--max-error-rate", "0.05", "--dry-run"]) == 0
    assert "would exit 3" in capsys.readouterr().out


# -- case 16: a Ray job's working dir ---------------------------------------------------------


def test_case_16_an_input_in_a_ray_jobs_working_dir_is_refused(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0a1b2c"
    _write(package / "photos", "a.jpg", b"x")
    status = main(
        ["run", "--input", str(package / "photos"), "--output", str(tmp_path / "o")]
        + ["--weights", "random"]
    )
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--working-dir" in err[0] and "s3://" in err[0], err


# -- case 17: a live run is found at the start ------------------------------------------------


def test_case_17_a_second_run_is_refused_before_any_work_and_leaves_nothing(
    output_uri, tmp_path, capsys
) -> None:  # type: ignore[no-untyped-def]
    output, options = output_uri
    photos = tmp_path / "photos"
    _write(photos, "a.jpg", b"")
    out = Output(output, options)
    endpoint = ["--endpoint-url", options["endpoint_url"]] if options else []
    with out.lease("20261205T010101Z-abcdef"):
        status = main(run_args(photos, output) + endpoint)
        assert status == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "run 20261205T010101Z-abcdef" in err[0], "\n".join(err)
        assert "is writing to" in err[0]
        out.fs.invalidate_cache()
        left = [p.rsplit("/", 1)[-1] for p in out.fs.ls(f"{out.root}/_staging")]
        assert left == ["20261205T010101Z-abcdef"]  # the refused run left nothing
    assert not out.fs.exists(f"{out.root}/_staging/20261205T010101Z-abcdef")
    assert read_manifest(output, storage_options=options) is None


def _s3(options: dict[str, str]) -> dict[str, str]:
    return {"endpoint_url": options["endpoint_url"]} if options else {}


def test_case_01_the_cleanup_lists_only_folders_that_can_hold_leftovers(
    tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A settled run's folder holds only what the manifest lists: the clean-up does not list
    it file by file (that would cost a LIST request per 1,000 files at every start)."""
    output = str(tmp_path / "out")
    _commit(output, "settled", ["/a.png"])
    orphan = tmp_path / "out" / "embeddings" / "run_id=killed" / "part-0.parquet"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"moved, never committed")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    listed: list[str] = []
    real = Output._files

    def counting(self: Output, path: str) -> dict[str, dict[str, Any]]:
        listed.append(path.rsplit("/", 1)[-1])
        return real(self, path)

    monkeypatch.setattr(Output, "_files", counting)
    assert Output(output).remove_orphans() == 1
    assert sorted(listed) == ["_staging", "run_id=killed"]
    assert not orphan.exists()
    assert read_embeddings(output)["uri"].to_pylist() == ["/a.png"]
