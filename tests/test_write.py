"""Writing: explicit schemas, fixed-size embedding lists, the contract's metadata on every file."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embed import ModelIdentity
from pipeline.write import EMBEDDINGS_SCHEMA, ERRORS_SCHEMA, file_metadata, write_batch

METADATA = file_metadata(
    model=ModelIdentity(
        weights="random:seed=0", weights_sha256="ab" * 32, normalized=False, precision="fp32"
    ),
    preprocessing={"mode": "center-crop", "resize_size": 232},
    run_id="r1",
)


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "uri": np.array(["/a.jpg", "/b.jpg", "/c.jpg"], dtype=object),
        "file_size": np.array([10, 20, 30], dtype=np.int64),
        "original_width": np.array([640, 0, 3], dtype=np.int32),
        "original_height": np.array([480, 0, 4], dtype=np.int32),
        "format": np.array(["JPEG", "", "PNG"], dtype=object),
        "error_type": np.array(["", "truncated", ""], dtype=object),
        "error_message": np.array(["", "image file is truncated", ""], dtype=object),
        "embedding": rng.standard_normal((3, 2048)).astype(np.float32),
        "source_version": np.array(["etag:a", "etag:b", "etag:c"], dtype=object),
    }


def test_write_batch_splits_rows_and_keeps_schema_and_metadata(tmp_path) -> None:  # type: ignore[no-untyped-def]
    batch = _batch()
    out = write_batch(batch, staging_uri=str(tmp_path), storage_options={}, metadata=METADATA)
    written = dict(zip(out["table"], out["path"], strict=True))
    assert dict(zip(out["table"], out["rows"], strict=True)) == {"embeddings": 2, "errors": 1}

    embeddings = pq.read_table(tmp_path / written["embeddings"])
    assert embeddings.schema.remove_metadata() == EMBEDDINGS_SCHEMA
    assert embeddings.schema.field("embedding").type == pa.list_(pa.float32(), 2048)
    assert embeddings["uri"].to_pylist() == ["/a.jpg", "/c.jpg"]
    assert embeddings["original_width"].to_pylist() == [640, 3]
    np.testing.assert_array_equal(
        np.stack(embeddings["embedding"].to_numpy(zero_copy_only=False)), batch["embedding"][[0, 2]]
    )
    meta = {
        k.decode(): v.decode()
        for k, v in pq.read_schema(tmp_path / written["embeddings"]).metadata.items()
    }
    assert meta["model"] == "resnet50" and meta["weights_sha256"] == "ab" * 32
    assert meta["embedding_dim"] == "2048" and meta["embedding_dtype"] == "float32"
    assert meta["normalized"] == "false" and meta["run_id"] == "r1" and meta["precision"] == "fp32"
    assert json.loads(meta["preprocessing"])["resize_size"] == 232

    errors = pq.read_table(tmp_path / written["errors"])
    assert errors.schema.remove_metadata() == ERRORS_SCHEMA
    assert errors.to_pylist() == [
        {
            "uri": "/b.jpg",
            "error_type": "truncated",
            "error_message": "image file is truncated",
            "file_size": 20,
            "source_version": "etag:b",
        }
    ]


def test_each_call_writes_new_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A retried task must not overwrite or extend what another attempt wrote.
    first = write_batch(_batch(), staging_uri=str(tmp_path), storage_options={}, metadata=METADATA)
    second = write_batch(_batch(), staging_uri=str(tmp_path), storage_options={}, metadata=METADATA)
    assert not set(first["path"]) & set(second["path"])
