"""Stage 1 from a list instead of LIST: an S3 Inventory report, or a file of URIs.

    --input-list s3://inventory/…/manifest.json   S3 Inventory (CSV, Parquet or ORC files:
                                                   bucket, key, size, ETag, last-modified)
    --input-list uris.parquet | uris.csv | uris.txt
                                                   a ``uri`` column (optional ``size`` and
                                                   ``version``), or one URI per line

The list is read a record batch at a time (never whole) and yields ``(path, info)`` like the
lister does, so the diff and everything after it are the same. Only entries under ``--input``
are kept: a bucket-wide inventory can feed a run over one prefix. An inventory is a complete
listing of its bucket (as of its date), so deletions are recorded as with LIST.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from pipeline.listing import InputError
from pipeline.storage import open_fs, to_uri

# The columns of an S3 Inventory report this needs, as its fileSchema names them.
INVENTORY_FIELDS = {"Bucket": "bucket", "Key": "key", "Size": "size", "ETag": "e_tag"}
BATCH_ROWS = 65_536


def iter_list_files(
    list_uri: str,
    input_fs: Any,
    input_root: str,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path on input_fs, info)`` of each file the list names under ``input_root``.

    ``info`` carries ``size`` and ``ETag`` (or ``version``) as the lister's infos do, so a
    run from a list and one from LIST make the same keys for the same objects.

    Raises:
        InputError: the list cannot be read, or has no ``uri`` (or inventory) columns.
    """
    fs, path = open_fs(list_uri, storage_options)
    try:
        under = _Under(input_fs, input_root)
        if path.endswith("manifest.json"):
            yield from _inventory(fs, path, under)
        else:
            yield from _uri_list(fs, path, under)
    except FileNotFoundError:
        raise InputError(f"--input-list not found: {to_uri(fs, path)}") from None
    except (pa.ArrowInvalid, UnicodeDecodeError, json.JSONDecodeError, KeyError) as exc:
        raise InputError(f"--input-list {to_uri(fs, path)} cannot be read: {exc}") from None


class _Under:
    """Which listed URIs lie under the run's ``--input``, and their paths on its filesystem:
    string prefixes only (no filesystem is opened per entry)."""

    def __init__(self, input_fs: Any, input_root: str) -> None:
        self.prefix = to_uri(input_fs, input_root.rstrip("/"))
        self.local = self.prefix.startswith("/")
        # A store's path drops "proto://"; a local path is the URI itself.
        self.cut = 0 if self.local else len(self.prefix.split("://", 1)[0]) + 3

    def path(self, uri: str) -> str | None:
        if self.local and uri.startswith("file://"):
            uri = uri[len("file://") :]
        if uri == self.prefix or uri.startswith(self.prefix + "/"):
            return uri[self.cut :]
        return None


def _uri_list(fs: Any, path: str, under: _Under) -> Iterator[Any]:
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix in ("parquet", "csv"):
        dataset = pads.dataset(path, filesystem=fs, format=suffix)
        if "uri" not in dataset.schema.names:
            raise InputError(f"--input-list {to_uri(fs, path)} has no 'uri' column")
        columns = [c for c in ("uri", "size", "version") if c in dataset.schema.names]
        for batch in dataset.to_batches(columns=columns, batch_size=BATCH_ROWS):
            yield from _uri_rows(batch, under)
        return
    with fs.open(path, "rb") as f:  # one URI per line
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(column_names=["uri"], block_size=1 << 22),
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={"uri": pa.string()}),
        )
        for batch in reader:
            yield from _uri_rows(batch, under)


def _uri_rows(batch: pa.RecordBatch, under: _Under) -> Iterator[tuple[str, dict[str, Any]]]:
    rows = batch.to_pydict()
    sizes = rows.get("size") or [None] * batch.num_rows
    versions = rows.get("version") or [None] * batch.num_rows
    for uri, size, version in zip(rows["uri"], sizes, versions, strict=True):
        found = under.path(uri.strip()) if uri else None
        if found is not None:
            info: dict[str, Any] = {"size": int(size or 0)}
            if version:
                info["version"] = str(version)
            yield found, info


def _inventory(fs: Any, path: str, under: _Under) -> Iterator[Any]:
    manifest = json.loads(fs.cat_file(path))
    file_format = str(manifest["fileFormat"]).lower()
    destination = str(manifest["destinationBucket"]).rsplit(":", 1)[-1]
    protocol = "s3"
    for entry in manifest["files"]:
        data = f"{destination}/{entry['key']}"
        if file_format == "csv":
            names = [n.strip() for n in str(manifest["fileSchema"]).split(",")]
            with fs.open(data, "rb", compression="gzip") as f:
                reader = pacsv.open_csv(
                    f, read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 22)
                )
                for batch in reader:
                    yield from _inventory_rows(batch, names, protocol, under, True)
        else:  # parquet or orc: columns named as the fields, in snake case
            dataset = pads.dataset(data, filesystem=fs, format=file_format)
            names = list(dataset.schema.names)
            for batch in dataset.to_batches(batch_size=BATCH_ROWS):
                yield from _inventory_rows(batch, names, protocol, under, False)


def _inventory_rows(
    batch: pa.RecordBatch,
    names: list[str],
    protocol: str,
    under: _Under,
    url_encoded: bool,
) -> Iterator[tuple[str, dict[str, Any]]]:
    by_field = {
        field: next(n for n in names if n in (field, snake))
        for field, snake in INVENTORY_FIELDS.items()
        if any(n in (field, snake) for n in names)
    }
    rows = batch.to_pydict()
    for bucket, key, size, etag in zip(
        *(
            rows[by_field[f]] if f in by_field else [None] * batch.num_rows
            for f in INVENTORY_FIELDS
        ),
        strict=True,
    ):
        if url_encoded:  # CSV inventories URL-encode object keys
            key = unquote(key.replace("+", " "))
        if key.endswith("/"):
            continue
        found = under.path(f"{protocol}://{bucket}/{key}")
        if found is not None:
            yield found, {"size": int(size or 0), "ETag": etag or ""}
