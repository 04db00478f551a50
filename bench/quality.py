"""What the vectors' statistics (pipeline.quality) cost a writer task: the time of
``batch_quality`` on a file's vectors, against the time the task takes to write that file
(``write_batch`` into a local folder, Parquet with zstd), per vector.

    python -m bench.quality --rows 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from bench.results import append
from pipeline.embed import EMBEDDING_DIM
from pipeline.quality import batch_quality
from pipeline.write import write_batch


def writer_batch(rows: int) -> dict[str, np.ndarray]:
    """A model batch as the writers get it: seeded vectors, all embedded."""
    rng = np.random.default_rng(0)
    uris = np.asarray([f"s3://bucket/photos/{i:08d}.jpg" for i in range(rows)], dtype=object)
    return {
        "uri": uris,
        "original_width": np.full(rows, 1024, np.int32),
        "original_height": np.full(rows, 768, np.int32),
        "format": np.full(rows, "JPEG", dtype=object),
        "file_size": np.full(rows, 150_000, np.int64),
        "source_version": np.full(rows, '"0123456789abcdef"', dtype=object),
        "embedding": rng.standard_normal((rows, EMBEDDING_DIM)).astype(np.float32),
        "error_type": np.full(rows, "", dtype=object),
        "error_message": np.full(rows, "", dtype=object),
    }


def best_seconds(call, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="vectors per file")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    batch = writer_batch(args.rows)
    stats = best_seconds(lambda: batch_quality(batch["embedding"], batch["uri"]), args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        writes = best_seconds(
            lambda: write_batch(batch, staging_uri=folder, storage_options={}, metadata={}),
            args.repeats,
        )
    per = {
        name: statistics.median(t) / args.rows * 1e6
        for name, t in (("stats", stats), ("write", writes))
    }
    append(
        "The vectors' statistics in the writer (issue 26, part 2)",
        [
            f"{args.rows:,} vectors of {EMBEDDING_DIM} float32 per file, median of "
            f"{args.repeats} repeats, one core:",
            "",
            "| step | µs per vector | share of the writer task |",
            "| --- | --- | --- |",
            f"| `batch_quality` (non-finite, all-zero, norm histogram) | {per['stats']:.1f} | "
            f"{per['stats'] / (per['stats'] + per['write']):.1%} |",
            f"| `write_batch` (Parquet, zstd, local disk) | {per['write']:.1f} | |",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
