"""``embed-images duplicates`` on a large table: exact groups, and ``--near`` through FAISS.

python -m bench.duplicates --vectors 1000000 --threshold 0.95

Writes a committed output of ``--vectors`` rows (random 2048-d vectors, files of 10,000 rows)
in which every 1,000th row has two near-duplicates elsewhere (the same vector plus noise:
cosine about 0.9988) and every 5,000th row's bytes are another row's (the same
``content_sha256``). Then, in a fresh process each, it runs :func:`exact_groups` and
:func:`near_groups` as the command does, and reports wall time, peak RSS, and how many planted
groups were found whole.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.results import append, machine
from pipeline.embed import EMBEDDING_DIM
from pipeline.write import EMBEDDINGS_SCHEMA, ROW_GROUP_ROWS

FILE_ROWS = 10_000
RUN_ID = "20260101T000000Z-aaaaaa"


def planted(n: int) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Near groups (row -> its two copies' rows) and exact pairs (row -> its twin)."""
    near = {r: [(r + n // 3) % n, (r + 2 * n // 3) % n] for r in range(0, n, 1000)}
    taken = {c for copies in near.values() for c in copies} | set(near)
    # Each pair once: r in the first half, its twin in the second (a twin is no row's original).
    exact = {r: r + n // 2 for r in range(500, n // 2, 5000) if r not in taken}
    return near, {r: t for r, t in exact.items() if t not in taken}


def write_table(root: Path, n: int) -> None:
    from pipeline.manifest import Manifest, RunCounts, RunRecord

    near, exact = planted(n)
    copy_of = {c: r for r, copies in near.items() for c in copies}
    twin_of = {t: r for r, t in exact.items()}
    folder = root / "embeddings" / f"run_id={RUN_ID}"
    folder.mkdir(parents=True)
    files = []
    for k, start in enumerate(range(0, n, FILE_ROWS)):
        rows = np.arange(start, min(n, start + FILE_ROWS))
        vectors = np.stack([_vector(int(r), copy_of, twin_of) for r in rows]).astype(np.float32)
        digests = [_digest(int(twin_of.get(int(r), r))) for r in rows]
        table = pa.table(
            [
                pa.array([f"s3://bucket/photos/{r:08d}.jpg" for r in rows]),
                pa.array(np.full(len(rows), 500), pa.int32()),
                pa.array(np.full(len(rows), 375), pa.int32()),
                pa.array(["JPEG"] * len(rows)),
                pa.array(np.full(len(rows), 50_000), pa.int64()),
                pa.array(["mtime:1"] * len(rows)),
                pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), EMBEDDING_DIM),
                pa.array(digests, pa.binary(32)),
            ],
            schema=EMBEDDINGS_SCHEMA,
        )
        pq.write_table(
            table,
            folder / f"part-{k:05d}.parquet",
            compression="zstd",
            row_group_size=ROW_GROUP_ROWS,
        )
        files.append(f"embeddings/run_id={RUN_ID}/part-{k:05d}.parquet")
    manifest, _ = Manifest.empty().with_run(
        RunRecord(
            run_id=RUN_ID,
            input="s3://bucket/photos",
            counts=RunCounts(embedded=n),
            model=None,
            preprocessing={},
            files={"embeddings": files},
        )
    )
    (root / "_manifest.json").write_bytes(manifest.to_bytes())


def _vector(r: int, copy_of: dict[int, int], twin_of: dict[int, int]) -> np.ndarray:
    base = np.random.default_rng(copy_of.get(r, twin_of.get(r, r))).standard_normal(EMBEDDING_DIM)
    if r in copy_of:
        base += 0.05 * np.random.default_rng(10**9 + r).standard_normal(EMBEDDING_DIM)
    return base


def _digest(r: int) -> bytes:
    return r.to_bytes(8, "big") * 4


def child(root: str, part: str, threshold: float) -> dict[str, Any]:
    from pipeline.duplicates import exact_groups, near_groups

    started = time.perf_counter()
    if part == "exact":
        groups = list(exact_groups(root))
    else:
        groups = list(near_groups(root, threshold))
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "groups": [g["uris"] for g in groups],
    }


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        print(json.dumps(child(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    n = args.vectors
    near, exact = planted(n)
    with tempfile.TemporaryDirectory(prefix="bench-duplicates-") as tmp:
        started = time.perf_counter()
        write_table(Path(tmp), n)
        print(
            f"table of {n:,} vectors written in {time.perf_counter() - started:.0f} s", flush=True
        )
        figures = {}
        for part in ("exact", "near"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.duplicates",
                    "_child",
                    tmp,
                    part,
                    str(args.threshold),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            figures[part] = json.loads(out.stdout.strip().splitlines()[-1])
            print(part, figures[part]["seconds"], flush=True)

    def uri(r: int) -> str:
        return f"s3://bucket/photos/{r:08d}.jpg"

    found_exact = {tuple(g) for g in figures["exact"]["groups"]}
    want_exact = {tuple(sorted([uri(r), uri(t)])) for r, t in exact.items()}
    found_near = [set(g) for g in figures["near"]["groups"]]
    whole = sum(
        any({uri(r), *map(uri, copies)} <= g for g in found_near) for r, copies in near.items()
    )
    planted_uris = {uri(r) for r in near} | {uri(c) for cs in near.values() for c in cs}
    planted_uris |= {u for pair in want_exact for u in pair}
    spurious = sum(1 for g in found_near if not g <= planted_uris)
    lines = [
        f"`python -m bench.duplicates --vectors {n} --threshold {args.threshold}` ({machine()}; "
        f"random 2048-d vectors, {len(near):,} planted near-duplicate triples at cosine "
        f"~0.9988, {len(exact):,} planted identical pairs)",
        "",
        f"- exact: {figures['exact']['seconds']:.1f} s, peak RSS "
        f"{figures['exact']['peak_rss'] / 2**30:.2f} GiB; {len(found_exact & want_exact):,} of "
        f"{len(want_exact):,} pairs found, {len(found_exact - want_exact)} other groups",
        f"- near (>= {args.threshold}): {figures['near']['seconds']:.0f} s, peak RSS "
        f"{figures['near']['peak_rss'] / 2**30:.2f} GiB; {whole:,} of {len(near):,} triples "
        f"found whole, {spurious} groups with an unplanted image",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append(f"Duplicates: {n:,} vectors", lines)


if __name__ == "__main__":
    main()
