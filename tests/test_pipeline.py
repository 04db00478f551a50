"""End to end through a real local Ray: local folder -> local output, and s3:// -> s3://."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_args
from PIL import Image, ImageOps

from pipeline.cli import main
from pipeline.manifest import RunRecord
from pipeline.read import read_embeddings, read_manifest
from pipeline.write import EMBEDDINGS_SCHEMA, ERRORS_SCHEMA

pytestmark = pytest.mark.slow

FAST = ["--batch-size", "4", "--decode-batch-size", "4", "--max-error-rate", "0.5"]


def _reference_embeddings(state_dict: dict[str, Any], images: list[bytes]) -> np.ndarray:
    from torchvision.models import ResNet50_Weights, resnet50

    model = resnet50(weights=None)
    model.load_state_dict(state_dict)
    model.fc = torch.nn.Identity()
    transform = ResNet50_Weights.IMAGENET1K_V2.transforms()
    tensors = [
        transform(ImageOps.exif_transpose(_open_first_frame(d)).convert("RGB")) for d in images
    ]
    with torch.inference_mode():
        return model.eval()(torch.stack(tensors)).numpy()


def _open_first_frame(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if image.mode.startswith("I;16") or image.mode == "I":
        # The contract scales 16-bit to 8-bit; Pillow's convert would clip.
        return Image.fromarray(
            np.rint(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8), "L"
        )
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image


def check_output(
    output: str,
    files: dict[str, tuple[bytes, tuple[int, int] | None, str | None]],
    uri_prefix: str,
    state_dict: dict[str, Any],
    weights_sha256: str,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
    dataset_root: str | None = None,
) -> None:
    good = {uri_prefix + n: v for n, v in files.items() if v[1] is not None}
    bad = {uri_prefix + n: v for n, v in files.items() if v[2] is not None}

    manifest = read_manifest(output, storage_options=storage_options)
    assert manifest is not None
    (run,) = manifest.runs
    assert run.counts.to_json() == {
        "listed": len(good) + len(bad),
        "skipped_by_extension": 1,
        "unchanged": 0,
        "known_failed": 0,
        "duplicates": 0,
        "embedded": len(good),
        "reused": 0,
        "failed": len(bad),
        "deleted": 0,
    }
    assert run.model is not None and run.model.weights_sha256 == weights_sha256
    assert run.preprocessing["mode"] == "center-crop"
    assert run.images_per_second > 0 and run.started_at <= run.finished_at

    table = read_embeddings(output, storage_options=storage_options)
    rows = {r["uri"]: r for r in table.drop_columns(["embedding"]).to_pylist()}
    assert len(rows) == table.num_rows == len(good)  # each image exactly once
    assert set(rows) == set(good)
    for uri, (data, upright, _) in good.items():
        assert (rows[uri]["original_width"], rows[uri]["original_height"]) == upright, uri
        assert rows[uri]["file_size"] == len(data)
        assert rows[uri]["format"] == Image.open(io.BytesIO(data)).format
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 2048)

    uris = table["uri"].to_pylist()
    ours = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    theirs = _reference_embeddings(state_dict, [good[u][0] for u in uris])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())

    errors = read_embeddings(output, storage_options=storage_options, table="errors")
    assert {r["uri"]: r["error_type"] for r in errors.to_pylist()} == {
        u: v[2] for u, v in bad.items()
    }
    assert all(r["error_message"] and "\n" not in r["error_message"] for r in errors.to_pylist())

    # The contract's plain read gives the same rows.
    plain = pads.dataset(
        dataset_root + "/embeddings",
        filesystem=filesystem,
        format="parquet",
        partitioning="hive",
    ).to_table()
    assert sorted(plain["uri"].to_pylist()) == sorted(uris)

    for relative in [*manifest.current["embeddings"], *manifest.current["errors"]]:
        path = f"{dataset_root}/{relative}"
        schema = pq.read_schema(filesystem.open(path) if filesystem else path)
        expected = EMBEDDINGS_SCHEMA if relative.startswith("embeddings/") else ERRORS_SCHEMA
        assert schema.remove_metadata() == expected
        meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
        assert meta["model"] == "resnet50" and meta["weights_sha256"] == weights_sha256
        assert meta["run_id"] == run.run_id and meta["embedding_dim"] == "2048"
        assert json.loads(meta["preprocessing"])["crop_size"] == 224


def test_local_folder_to_local_output(
    corpus, tmp_path, ray_session, random_checkpoint, capsys
) -> None:  # type: ignore[no-untyped-def]
    root, files = corpus
    output = tmp_path / "out"
    status = main(run_args(root, output, *FAST, weights=random_checkpoint))
    assert status == 0
    summary = capsys.readouterr().out
    assert "embedded   10" in summary and "failed     3" in summary
    # Failures by type, each with one example to look at.
    for kind, name in (("empty", "empty.png"), ("not_an_image", "bad.jpg")):
        assert f"  {kind} 1, e.g. {root / name}" in summary, summary
    assert "while embedding" in summary

    # The run report: data beside the output, and one page that fetches nothing.
    assert main(["status", str(output), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    report = json.loads((output / "_reports" / f"{run['run_id']}.json").read_text())
    assert report["run"]["counts"] == run["counts"] and report["run"]["failures"] == run["failures"]
    assert set(report["stage_seconds"]) == {"start-up", "listing", "execution", "commit"}
    assert sum(s["images"] for s in report["throughput"]) == 13  # every image written, once
    assert report["config"]["weights"] == str(random_checkpoint)
    assert {"ray", "torch", "pyarrow"} <= set(report["versions"]) and report["host"]["cpus"]
    page = (output / "_reports" / f"{run['run_id']}.html").read_text()
    assert "<svg" in page and "not_an_image" in page
    assert not re.search(r"<script|<link|src=|href=|url\(", page)  # self-contained
    assert f"report     {output}/_reports/{run['run_id']}.html" in summary
    check_output(
        str(output),
        files,
        str(root) + "/",
        torch.load(random_checkpoint, weights_only=True),
        hashlib.sha256(random_checkpoint.read_bytes()).hexdigest(),
        dataset_root=str(output),
    )
    assert not (output / "_staging").exists()


def test_s3_to_s3(corpus, s3_bucket, s3_endpoint, ray_session) -> None:  # type: ignore[no-untyped-def]
    from pipeline.weights import load_weights

    root, files = corpus
    s3, bucket = s3_bucket
    s3.put(str(root) + "/", f"{bucket}/photos/", recursive=True)
    output = f"s3://{bucket}/embeddings/resnet50"
    status = main(run_args(f"s3://{bucket}/photos/", output, "--endpoint-url", s3_endpoint, *FAST))
    assert status == 0
    weights = load_weights("random", seed=0)
    s3.invalidate_cache()
    check_output(
        output,
        files,
        f"s3://{bucket}/photos/",
        dict(weights.state_dict),
        weights.sha256,
        storage_options={"endpoint_url": s3_endpoint},
        filesystem=s3,
        dataset_root=f"{bucket}/embeddings/resnet50",
    )
    assert not s3.exists(f"{bucket}/embeddings/resnet50/_staging")


def test_limit_and_resize_mode_are_recorded(corpus, tmp_path, ray_session) -> None:  # type: ignore[no-untyped-def]
    root, _ = corpus
    output = tmp_path / "out"
    status = main(
        run_args(root, output, "--resize", "letterbox", "--limit", "2", "--normalize", *FAST)
    )
    assert status == 0
    manifest = read_manifest(str(output))
    assert manifest is not None and manifest.runs[0].counts.listed == 2
    assert manifest.preprocessing is not None and manifest.model is not None
    assert manifest.preprocessing["mode"] == "letterbox" and manifest.model.normalized is True
    table = read_embeddings(str(output))
    norms = np.linalg.norm(np.stack(table["embedding"].to_numpy(zero_copy_only=False)), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    meta = pq.read_schema(Path(output) / manifest.current["embeddings"][0]).metadata
    assert json.loads(meta[b"preprocessing"])["mode"] == "letterbox"
    assert meta[b"normalized"] == b"true"


def test_readme_python_example_runs(
    tmp_path, make_image, ray_session, monkeypatch, doc_examples
) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(10):  # and 1 bad of 11: under the default --max-error-rate
        (photos / f"p{i}.jpg").write_bytes(make_image((40 + i, 30), seed=i))
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(doc_examples["api"], "README.md:api", "exec"), scope)  # noqa: S102
    run = scope["run"]
    assert isinstance(run, RunRecord)
    assert (run.counts.embedded, run.counts.failed) == (10, 1)
    (kind, failure), *others = run.failures.items()
    assert (kind, failure["count"], failure["example_uri"], others) == (
        "not_an_image",
        1,
        str(photos / "broken.jpg"),
        [],
    )
    assert failure["example_message"]  # what went wrong, in one line
    assert sorted(read_embeddings("out")["uri"].to_pylist()) == [
        str(photos / f"p{i}.jpg") for i in range(10)
    ]


def test_embed_images_names_an_unknown_option() -> None:
    from pipeline import embed_images
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="unknown option 'batchsize'"):
        embed_images(input="photos", output="out", batchsize=8)


def _run_on_corpus(corpus, output: Path, embedder: Any = None, **knobs: Any) -> RunRecord:  # type: ignore[no-untyped-def]
    """``execute_run`` on the ``corpus`` fixture's images (seeded random weights, bad images
    kept as errors) into ``output``, with a model stage class of the test's own."""
    from pipeline.config import EmbedConfig
    from pipeline.embed import ResNet50Embedder
    from pipeline.run import execute_run, prepare_run

    root, _ = corpus
    config = EmbedConfig(
        input=str(root), output=str(output), weights="random", max_error_rate=1.0, **knobs
    )
    return execute_run(prepare_run(config), embedder=embedder or ResNet50Embedder)


def test_decoding_on_the_model_device_gives_the_cpu_paths_rows(
    corpus, tmp_path, ray_session, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """``--decode-device cuda`` with the actors' device forced to this machine's CPU: the
    fetch stage, the actor's decode and the sink give the rows the CPU path gives."""
    from pipeline import checks
    from pipeline.embed import ResNet50Embedder

    class OnThisCpu(ResNet50Embedder):
        def __init__(self, **kwargs: Any) -> None:
            assert kwargs["decode_spec"] is not None  # the plan sends bytes
            super().__init__(**kwargs, device="cpu")

    monkeypatch.setattr(checks, "check_decode_device", lambda config, num_gpus: None)
    _run_on_corpus(corpus, tmp_path / "cpu", batch_size=4)
    run = _run_on_corpus(corpus, tmp_path / "dev", OnThisCpu, batch_size=4, decode_device="cuda")
    assert run.counts.embedded == 10 and run.counts.failed == 3
    for table in ("embeddings", "errors"):
        want = read_embeddings(str(tmp_path / "cpu"), table=table).sort_by("uri")
        got = read_embeddings(str(tmp_path / "dev"), table=table).sort_by("uri")
        assert got.column("uri").to_pylist() == want.column("uri").to_pylist()
        for column in want.column_names:
            if column not in ("embedding", "run_id", "error_message"):
                assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
    want_vectors, got_vectors = (
        np.array(read_embeddings(str(tmp_path / out)).sort_by("uri")["embedding"].to_pylist())
        for out in ("cpu", "dev")
    )
    relative = np.linalg.norm(got_vectors - want_vectors, axis=1) / np.linalg.norm(
        want_vectors, axis=1
    )
    assert relative.max() < 0.01


@pytest.mark.timeout(300)
def test_two_cpu_actors_of_half_a_cpu_each_leave_a_two_cpu_ray_room_to_decode(
    corpus, tmp_path, ray_session, caplog
) -> None:  # type: ignore[no-untyped-def]
    """``--concurrency 2 --model-threads 1 --model-cpus 0.5`` on 2 CPUs: the actors leave a
    CPU to decode and write on, and both embed. (With a CPU reserved each, nothing could
    decode and the run waited forever.)"""
    import os

    import torch

    from pipeline.embed import ResNet50Embedder

    calls = tmp_path / "calls"
    calls.mkdir()

    class Recording(ResNet50Embedder):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = super().__call__(batch)
            (calls / f"{os.getpid()}-{len(list(calls.iterdir()))}").write_text(
                str(torch.get_num_threads())
            )
            return out

    run = _run_on_corpus(
        corpus,
        tmp_path / "out",
        Recording,
        batch_size=1,
        decode_batch_size=1,
        concurrency=2,
        model_threads=1,
        model_cpus=0.5,
    )
    assert run.counts.embedded == 10 and run.counts.failed == 3
    assert "CPU model actors reserve" not in caplog.text  # they fit: no warning
    records = {path.name.split("-")[0]: path.read_text() for path in calls.iterdir()}
    assert len(records) == 2 and set(records.values()) == {"1"}  # two actors, a thread each


def test_cpu_actors_that_leave_no_cpu_to_decode_are_refused_in_one_line(caplog) -> None:  # type: ignore[no-untyped-def]
    from pipeline.checks import check_cpu_actors_fit
    from pipeline.config import ConfigError, EmbedConfig

    def config(**knobs: Any) -> EmbedConfig:
        return EmbedConfig(input="in", output="out", **knobs)

    with pytest.raises(
        ConfigError,
        match=r"^--concurrency 2: .* 3 CPUs in all, and this Ray has 2: .*--model-cpus 0\.5",
    ):
        check_cpu_actors_fit(config(concurrency=2), 0.0, 2.0, fixed=True)
    # An autoscaling pool needs room for its minimum; one actor on one CPU leaves none.
    with pytest.raises(
        ConfigError, match=r"--model-cpus 0\.25 --decode-cpus 0\.5 --write-cpus 0\.5"
    ):
        check_cpu_actors_fit(config(concurrency=(2, 4)), 0.0, 1.0, fixed=True)
    with pytest.raises(ConfigError, match="this Ray has 1:"):
        check_cpu_actors_fit(config(), 0.0, 1.0, fixed=True)
    check_cpu_actors_fit(config(), 0.0, 2.0, fixed=True)  # the default on 2 CPUs
    check_cpu_actors_fit(config(concurrency=2, model_cpus=0.5), 0.0, 2.0, fixed=True)
    check_cpu_actors_fit(config(concurrency=8), 1.0, 2.0, fixed=True)  # GPU actors: no CPU
    assert not caplog.text
    # A cluster may grow (an autoscaler): said, not refused.
    check_cpu_actors_fit(config(concurrency=4), 0.0, 2.0, fixed=False)
    assert "the run waits until the cluster grows" in caplog.text


def test_calls_per_actor_runs_batches_at_once_in_one_actor(
    corpus, tmp_path, ray_session, caplog
) -> None:  # type: ignore[no-untyped-def]
    """``--calls-per-actor 2``: Ray Data runs two of the one actor's calls at a time, in two
    threads, and every image is still embedded once."""
    import os
    import threading
    import time

    from pipeline.embed import ResNet50Embedder

    calls = tmp_path / "calls"
    calls.mkdir()

    class Recording(ResNet50Embedder):
        def __init__(self, **kwargs: Any) -> None:
            assert kwargs["concurrent_calls"] == 2
            super().__init__(**kwargs)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.time()
            time.sleep(0.5)  # long enough for the other thread's call to begin meanwhile
            out = super().__call__(batch)
            record = f"{os.getpid()} {threading.get_ident()} {start} {time.time()}"
            (calls / f"{start}-{threading.get_ident()}").write_text(record)
            return out

    run = _run_on_corpus(
        corpus, tmp_path / "out", Recording, batch_size=2, decode_batch_size=2, calls_per_actor=2
    )
    assert run.counts.embedded == 10 and run.counts.failed == 3
    assert "--calls-per-actor 2 on CPU model actors" in caplog.text  # said, not refused
    assert len(read_embeddings(str(tmp_path / "out"))) == 10
    records = [path.read_text().split() for path in calls.iterdir()]
    assert len({pid for pid, *_ in records}) == 1  # one actor
    assert len({thread for _, thread, *_ in records}) >= 2
    spans = sorted((float(a), float(b)) for *_, a, b in records)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def test_decode_device_cuda_is_refused_in_one_line_without_gpus() -> None:
    from pipeline.checks import check_decode_device
    from pipeline.config import ConfigError, EmbedConfig

    config = EmbedConfig(input="in", output="out", decode_device="cuda")
    with pytest.raises(ConfigError, match=r"^--decode-device cuda needs GPU model actors"):
        check_decode_device(config, 0.0)
    check_decode_device(config, 1.0)
    with pytest.raises(ConfigError, match="--decode-device 'tpu'"):
        EmbedConfig(input="in", output="out", decode_device="tpu")  # type: ignore[arg-type]
