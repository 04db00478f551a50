"""Incremental runs: only new or changed images are embedded, each image is current once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from conftest import run_args

from pipeline.cli import main
from pipeline.current import CommittedImages
from pipeline.failures import failures_by_type
from pipeline.manifest import MANIFEST_FORMAT, Manifest
from pipeline.read import read_embeddings, read_manifest


def test_unchanged_images_are_skipped_and_transient_errors_retried() -> None:
    listing = pa.table(
        {
            "uri": ["a", "b", "c", "d"],
            "path": ["a", "b", "c", "d"],
            "file_size": [1, 2, 3, 4],
            "source_version": ["v1", "v2", "v1", "v1"],
        }
    )
    embeddings = pa.table({"uri": ["a", "b"], "file_size": [1, 2], "source_version": ["v1", "v1"]})
    errors = pa.table(
        {
            "uri": ["c", "d"],
            "file_size": [3, 4],
            "source_version": ["v1", "v1"],
            "error_type": ["truncated", "unreadable"],
        }
    )
    diff = CommittedImages(embeddings, errors).diff(listing)
    # a unchanged; b changed (version); c failed for good; d failed transiently: retried.
    assert diff.new["uri"].to_pylist() == ["b", "d"]
    assert diff.unchanged == 1
    known = failures_by_type(
        *CommittedImages(embeddings, errors).failure_columns(diff.known_failed_rows)
    )
    assert known == {"truncated": {"count": 1, "example_uri": "c", "example_message": ""}}


def _write(root: Path, name: str, make_image, seed: int) -> None:  # type: ignore[no-untyped-def]
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make_image((40 + seed, 30), seed=seed))


def _embedded(output: Path) -> dict[str, tuple[str, np.ndarray]]:
    table = read_embeddings(str(output))
    vectors = table["embedding"].to_numpy(zero_copy_only=False)
    return {
        u: (r, v)
        for u, r, v in zip(
            table["uri"].to_pylist(), table["run_id"].to_pylist(), vectors, strict=True
        )
    }


@pytest.mark.slow
def test_runs_embed_only_what_is_new_and_each_image_stays_once(
    tmp_path, make_image, ray_session
) -> None:  # type: ignore[no-untyped-def]
    photos, output = tmp_path / "photos", tmp_path / "out"
    for i in range(4):
        _write(photos, f"img{i}.jpg", make_image, seed=i)
    args = run_args(photos, output, "--batch-size", "4")
    assert main(args) == 0
    first = _embedded(output)
    assert len(first) == 4

    # Two new images, one changed (new bytes, new size), one deleted.
    _write(photos, "new/img4.jpg", make_image, seed=4)
    _write(photos, "new/img5.jpg", make_image, seed=5)
    _write(photos, "img0.jpg", make_image, seed=40)
    os.remove(photos / "img3.jpg")
    assert main(args) == 0
    manifest = read_manifest(str(output))
    assert manifest is not None
    counts = manifest.runs[-1].counts
    assert (counts.listed, counts.unchanged, counts.embedded, counts.deleted) == (
        5,
        2,
        3,
        1,
    )
    second = _embedded(output)
    uris = {
        str(photos / n)
        for n in ("img0.jpg", "img1.jpg", "img2.jpg", "new/img4.jpg", "new/img5.jpg")
    }
    assert set(second) == uris  # img3 gone, every other image once
    run2 = manifest.runs[-1].run_id
    assert second[str(photos / "img0.jpg")][0] == run2  # the changed image's newest row won
    assert not np.array_equal(
        second[str(photos / "img0.jpg")][1], first[str(photos / "img0.jpg")][1]
    )
    np.testing.assert_array_equal(
        second[str(photos / "img1.jpg")][1], first[str(photos / "img1.jpg")][1]
    )

    # The DuckDB recipe for readers without this library (docs/search.md) agrees.
    import re

    page = (Path(__file__).resolve().parents[1] / "docs" / "search.md").read_text()
    recipe = re.search(r"<!-- tested: duckdb -->\n```python\n(.*?)```", page, re.S)
    assert recipe
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict[str, object] = {}
        exec(compile(recipe.group(1), "docs/search.md:duckdb", "exec"), scope)  # noqa: S102
    finally:
        os.chdir(cwd)
    duck = scope["current"]
    assert sorted(zip(duck["uri"].to_pylist(), duck["run_id"].to_pylist(), strict=True)) == sorted(
        (u, r) for u, (r, _) in second.items()
    )

    # The same command again: nothing new, nothing duplicated.
    assert main(args) == 0
    manifest = read_manifest(str(output))
    assert manifest is not None and manifest.runs[-1].counts.embedded == 0
    assert set(_embedded(output)) == uris

    # --full re-embeds everything and replaces the files: the plain read is clean again.
    assert main([*args, "--full"]) == 0
    plain = pads.dataset(
        str(output / "embeddings"), format="parquet", partitioning="hive"
    ).to_table()
    assert sorted(plain["uri"].to_pylist()) == sorted(uris)


@pytest.mark.slow
def test_other_weights_into_the_same_output_are_refused(
    tmp_path, make_image, ray_session, capsys
) -> None:  # type: ignore[no-untyped-def]
    photos, output = tmp_path / "photos", tmp_path / "out"
    _write(photos, "a.jpg", make_image, seed=1)
    base = run_args(photos, output)
    assert main(base) == 0
    assert main([*base, "--seed", "1"]) == 2  # no retry can help: exit 2 (issue 23, case 14)
    assert "pass --full to replace them" in capsys.readouterr().err


@pytest.mark.slow
def test_error_rate_above_the_limit_commits_only_errors(
    corpus, tmp_path, ray_session, capsys
) -> None:  # type: ignore[no-untyped-def]
    root, _ = corpus  # 3 of 13 images are bad: 23%
    output = tmp_path / "out"
    args = run_args(root, output)
    status = main([*args, "--max-error-rate", "0.1", "--batch-size", "4"])
    assert status == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert "3 of 13 images failed (23.1%: empty 1, not_an_image 1, truncated 1)" in err[-1]
    assert "above --max-error-rate 10.0%" in err[-1]
    assert read_embeddings(str(output)).num_rows == 0
    assert sorted(read_embeddings(str(output), table="errors")["error_type"].to_pylist()) == [
        "empty",
        "not_an_image",
        "truncated",
    ]

    # The same command again: the bad images are known failures, not retried, and still
    # counted, so the run fails the same way instead of committing as if all were well.
    assert main([*args, "--batch-size", "4"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        "3 of 13 images failed (23.1%: empty 1, not_an_image 1, truncated 1, 3 of them refused "
        in (err[-1])
    )
    assert "nothing embedded; fix or remove those images" in err[-1]  # known alone: no work
    assert read_embeddings(str(output)).num_rows == 0
    # Raising the limit lets the good images in; the summary says what is known to be bad.
    assert main([*args, "--max-error-rate", "0.5"]) == 0
    summary = capsys.readouterr().out
    assert "embedded   10" in summary and "known bad  3 (failed in earlier runs" in summary
    assert f"  truncated 1, e.g. {root / 'truncated.jpg'}" in summary
    manifest = read_manifest(str(output))
    assert manifest is not None
    assert (manifest.runs[-1].counts.known_failed, manifest.runs[-1].counts.failed) == (3, 0)


def test_nightly_guard_recognises_a_committed_run_of_that_date() -> None:
    import datetime as dt

    from jobs.nightly import already_ran, nightly_run_id

    night = dt.date(2026, 11, 25)
    run_id = nightly_run_id(night, dt.datetime(2026, 11, 25, 2, 0, tzinfo=dt.UTC))
    assert run_id == "20261125T020000Z-nightly"

    def manifest(status: str) -> Manifest:
        runs = [{"run_id": run_id, "status": status}]
        return Manifest.from_json({"format": MANIFEST_FORMAT, "version": 1, "runs": runs})

    assert already_ran(manifest("committed"), night) == run_id
    assert already_ran(manifest("committed"), dt.date(2026, 11, 26)) is None
    assert already_ran(manifest("failed: error rate"), night) is None


@pytest.mark.slow
def test_nightly_job_twice_for_one_date_runs_once(
    tmp_path, make_image, ray_session, capsys
) -> None:  # type: ignore[no-untyped-def]
    from jobs.nightly import main as nightly

    photos, output = tmp_path / "photos", tmp_path / "out"
    _write(photos, "a.jpg", make_image, seed=1)
    args = [
        "--input",
        str(photos),
        "--output",
        str(output),
        "--weights",
        "random",
        "--date",
        "2026-11-25",
    ]
    assert nightly(args) == 0
    assert nightly(args) == 0
    assert "already committed" in capsys.readouterr().out
    manifest = read_manifest(str(output))
    assert manifest is not None and len(manifest.runs) == 1
    assert manifest.runs[0].run_id.startswith("20261125T")
    with pytest.raises(SystemExit) as info:
        nightly(["--input", str(photos), "--output", str(output), "--full"])
    assert info.value.code == 2


@pytest.mark.slow
def test_a_dry_run_diffs_without_ray_or_weights_and_writes_nothing(
    tmp_path, make_image, ray_session
) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    photos, output = tmp_path / "photos", tmp_path / "out"
    for i in range(3):
        _write(photos, f"img{i}.jpg", make_image, seed=i)
    base = run_args(photos, output)
    assert main(base) == 0
    _write(photos, "new.jpg", make_image, seed=9)
    os.remove(photos / "img2.jpg")
    manifest_before = (output / "_manifest.json").read_bytes()
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}

    def dry(*extra: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *base, "--dry-run", *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
        return result.stdout.splitlines()

    lines = dry()
    assert lines[0] == "embed-images: dry run: nothing was embedded or written"
    rows = {line[2:12].strip(): line[13:].split()[0] for line in lines[1:]}
    assert [rows[k] for k in ("listed", "to embed", "unchanged", "deleted")] == ["3", "1", "2", "1"]
    assert any(line.startswith("  eta ") for line in lines)  # from the first run's rate
    assert not [line for line in lines if "would stop" in line]
    assert any("would stop" in line and "random:seed=0" in line for line in dry("--seed", "5"))
    assert not any(ray_tmp.iterdir())  # no Ray session was created
    assert (output / "_manifest.json").read_bytes() == manifest_before
    assert not (output / "_staging").exists()

    # With nothing new, the real run commits in seconds, without Ray or weights, and still
    # records that img2.jpg is gone.
    os.remove(photos / "new.jpg")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *base],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "embedded   0" in result.stdout and "deleted    1" in result.stdout
    assert not any(ray_tmp.iterdir())
    assert sorted(read_embeddings(str(output))["uri"].to_pylist()) == [
        str(photos / "img0.jpg"),
        str(photos / "img1.jpg"),
    ]


def test_the_uri_set_agrees_with_a_python_set_batch_by_batch() -> None:
    from pipeline.incremental import UriSet

    rng = np.random.default_rng(5)
    seen, exact = UriSet(), set()
    for size in rng.integers(1, 300, size=60):
        batch = [f"s3://b/{n}.jpg" for n in rng.integers(0, 2000, size=size)]
        first = UriSet.add(seen, pa.array(batch)).tolist()
        expected = []
        for uri in batch:
            expected.append(uri not in exact)
            exact.add(uri)
        assert first == expected


def test_the_uri_set_tells_apart_uris_whose_first_hashes_collide() -> None:
    from pipeline.incremental import _contains

    seen1 = np.array([5, 7, 7, 7, 9], dtype=np.uint64)  # three URIs share a first hash
    seen2 = np.array([1, 2, 3, 4, 5], dtype=np.uint64)
    h1 = np.array([7, 7, 7, 7, 9, 9, 4, 10], dtype=np.uint64)
    h2 = np.array([2, 4, 3, 8, 5, 6, 1, 1], dtype=np.uint64)
    assert _contains(seen1, seen2, h1, h2).tolist() == [
        True,
        True,
        True,
        False,
        True,
        False,
        False,
        False,
    ]
