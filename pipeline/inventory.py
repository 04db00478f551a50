"""Stage 1 from a list instead of LIST: an S3 Inventory report, or a file of URIs.

    --input-list s3://inventory/…/manifest.json   S3 Inventory (CSV, Parquet or ORC files:
                                                   bucket, key, size, ETag, last-modified)
    --input-list uris.parquet | uris.csv | uris.txt
                                                   a ``uri`` column (optional ``size`` and
                                                   ``version``), or one URI per line

The driver reads only an inventory's ``manifest.json``. A run's list files are read by Ray
Data, one read task per file (:func:`pipeline.feed.read_list`); a dry run or a small run's
probe, which start no Ray, read them in-process (:meth:`InputList.tables`). Both yield the same
Arrow tables of ``LISTING_SCHEMA`` plus an ``image`` flag (the contract's extensions), built
with Arrow compute a record batch at a time, so the list is never held whole and nothing is
done per entry in Python but the URL-decoding of the keys that need it. Only entries under
``--input`` are kept: a bucket-wide inventory can feed a run over one prefix. An inventory is
a complete listing of its bucket (as of its date), so deletions are recorded as with LIST.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from pipeline.listing import IMAGE_EXTENSIONS, LISTING_SCHEMA, InputError
from pipeline.storage import open_fs, to_uri

# The columns of an S3 Inventory report this needs, as its fileSchema names them.
INVENTORY_FIELDS = {
    "Bucket": "bucket",
    "Key": "key",
    "Size": "size",
    "ETag": "e_tag",
    # A versioned bucket's inventory of all versions: only the latest, live version counts.
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
}
BATCH_ROWS = 65_536
# What a list's tables carry: the listing's columns, and whether the name is an image's.
LIST_SCHEMA = LISTING_SCHEMA.append(pa.field("image", pa.bool_(), nullable=False))
# A name with an image extension, as ``has_image_extension`` (``os.path.splitext``) sees it:
# a basename's leading dots are not an extension's.
_IMAGE_NAME = r"(^|/)\.*[^/.][^/]*\.(" + "|".join(sorted(IMAGE_EXTENSIONS)) + r")$"


@dataclasses.dataclass(frozen=True)
class ListFile:
    """One file of an input list, and how to read it (picklable: a Ray read task's input).

    Args:
        path: On the list's filesystem.
        file_format: ``csv``, ``parquet``, ``orc`` or ``text`` (one URI per line).
        inventory: An S3 Inventory data file (bucket, key, size, ETag columns) rather than a
            ``uri`` column.
        csv_columns: The names of a CSV without a header line (an inventory's fileSchema).
        compression: ``gzip`` for an inventory's CSV files.
    """

    path: str
    file_format: str
    inventory: bool = False
    csv_columns: tuple[str, ...] = ()
    compression: str | None = None


@dataclasses.dataclass(frozen=True)
class InputList:
    """An ``--input-list``: its files, and the ``--input`` prefix its entries must lie under.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "list.txt").write_text(f"{folder}/a.jpg\\n{folder}/b.txt\\n/x/c.jpg\\n")
        >>> listed = InputList.open(str(folder / "list.txt"), str(folder))
        >>> [(t["path"].to_pylist(), t["image"].to_pylist()) for t in listed.tables()]
        ... # doctest: +ELLIPSIS
        [(['.../a.jpg', '.../b.txt'], [True, False])]
    """

    uri: str
    files: tuple[ListFile, ...]
    prefix: str  # --input as a URI, no trailing slash
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def open(
        cls, list_uri: str, input_uri: str, storage_options: Mapping[str, Any] | None = None
    ) -> InputList:
        """Resolve ``list_uri`` to its files (an inventory's manifest is read here).

        Raises:
            InputError: the list, or its manifest, cannot be read.
        """
        options = dict(storage_options or {})
        fs, path = open_fs(list_uri, options)
        input_fs, input_root = open_fs(input_uri, options)
        prefix = to_uri(input_fs, input_root.rstrip("/"))
        with _list_errors(to_uri(fs, path)):
            if path.endswith("manifest.json"):
                files = _inventory_files(fs, path)
            else:
                suffix = path.rsplit(".", 1)[-1].lower()
                file_format = suffix if suffix in ("parquet", "csv", "orc") else "text"
                files = (ListFile(to_uri(fs, path), file_format),)
                if file_format != "text":
                    columns = pads.dataset(path, filesystem=fs, format=file_format).schema.names
                    if "uri" not in columns:
                        raise InputError(
                            f"--input-list {to_uri(fs, path)} has no 'uri' column "
                            f"(it has: {', '.join(columns)})"
                        )
        return cls(to_uri(fs, path), files, prefix, options)

    def tables(self) -> Iterator[pa.Table]:
        """The list's entries under the prefix, read in this process, in the list's order."""
        for entry in self.files:
            yield from self.read(entry)

    def read(self, entry: ListFile) -> Iterator[pa.Table]:
        """One list file's entries under the prefix, a record batch at a time."""
        fs, path = open_fs(entry.path, self.storage_options)
        with _list_errors(entry.path):
            for batch in _batches(fs, path, entry):
                table = (
                    _inventory_rows(batch, url_encoded=entry.file_format == "csv")
                    if entry.inventory
                    else _uri_rows(batch)
                )
                yield self._under(table)

    def _under(self, table: pa.Table) -> pa.Table:
        """``uri``/``file_size``/``source_version`` rows -> ``LIST_SCHEMA`` rows under the
        prefix, with their paths on the input's filesystem."""
        uri = table["uri"]
        local = self.prefix.startswith("/")
        if local:
            uri = pc.replace_substring_regex(uri, "^file://", "")
        keep = pc.and_(
            pc.and_(
                pc.invert(pc.ends_with(uri, "/")),
                # "in/../outside/x.jpg" starts with the prefix and is not under it: an entry
                # with a "." or ".." part is never taken as inside the input.
                pc.invert(pc.match_substring_regex(uri, r"(^|/)\.\.?(/|$)")),
            ),
            pc.or_(pc.equal(uri, self.prefix), pc.starts_with(uri, self.prefix + "/")),
        )
        keep = pc.fill_null(keep, False)
        table = table.set_column(0, "uri", uri).filter(keep)
        uri = table["uri"]
        # A store's path drops "proto://"; a local path is the URI itself.
        cut = 0 if local else len(self.prefix.split("://", 1)[0]) + 3
        path = pc.utf8_slice_codeunits(uri, cut) if cut else uri
        image = pc.match_substring_regex(pc.utf8_lower(path), _IMAGE_NAME)
        return pa.table(
            [uri, path, table["file_size"], table["source_version"], image], schema=LIST_SCHEMA
        )


@contextlib.contextmanager
def _list_errors(uri: str) -> Iterator[None]:
    """Turn a list file's read failures into one ``InputError`` line that names it."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"--input-list not found: {uri}") from None
    except (pa.ArrowInvalid, UnicodeDecodeError, json.JSONDecodeError, KeyError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise InputError(f"--input-list {uri} cannot be read: {message}") from None


def _inventory_files(fs: Any, path: str) -> tuple[ListFile, ...]:
    manifest = json.loads(fs.cat_file(path))
    file_format = str(manifest["fileFormat"]).lower()
    destination = str(manifest["destinationBucket"]).rsplit(":", 1)[-1]
    names = tuple(n.strip() for n in str(manifest["fileSchema"]).split(","))
    csv = file_format == "csv"
    return tuple(
        ListFile(
            f"s3://{destination}/{entry['key']}",
            file_format,
            inventory=True,
            csv_columns=names if csv else (),
            compression="gzip" if csv else None,
        )
        for entry in manifest["files"]
    )


def _batches(fs: Any, path: str, entry: ListFile) -> Iterator[pa.RecordBatch]:
    if entry.file_format in ("parquet", "orc"):
        dataset = pads.dataset(path, filesystem=fs, format=entry.file_format)
        names = dataset.schema.names
        columns = (
            [n for n in names if _field_of(n) is not None]
            if entry.inventory
            else [c for c in ("uri", "size", "version") if c in names]
        )
        yield from dataset.to_batches(columns=columns, batch_size=BATCH_ROWS)
        return
    if entry.file_format == "csv" and not entry.inventory:
        read = pacsv.ReadOptions(block_size=1 << 22)
        convert = pacsv.ConvertOptions(
            column_types={"uri": pa.string(), "version": pa.string()},
            include_columns=["uri", "size", "version"],
            include_missing_columns=True,
        )
        parse = pacsv.ParseOptions()
    elif entry.file_format == "csv":  # an inventory's: no header; keys URL-encoded
        read = pacsv.ReadOptions(column_names=list(entry.csv_columns), block_size=1 << 22)
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in entry.csv_columns})
        parse = pacsv.ParseOptions()
    else:  # text: one URI per line, nothing quoted
        read = pacsv.ReadOptions(column_names=["uri"], block_size=1 << 22)
        convert = pacsv.ConvertOptions(column_types={"uri": pa.string()})
        parse = pacsv.ParseOptions(delimiter="\x1f", quote_char=False)
    with fs.open(path, "rb", compression=entry.compression) as f:
        yield from pacsv.open_csv(
            f, read_options=read, parse_options=parse, convert_options=convert
        )


def _field_of(name: str) -> str | None:
    """The inventory field (``Bucket``, ``Key``...) a column holds, in either spelling."""
    return next((f for f, snake in INVENTORY_FIELDS.items() if name in (f, snake)), None)


def _uri_rows(batch: pa.RecordBatch) -> pa.Table:
    """A URI list's batch -> ``uri``, ``file_size``, ``source_version`` (as ``source_version``
    makes them from a ``version``: ``version:<v>``, or nothing)."""
    n = batch.num_rows
    names = batch.schema.names
    uri = pc.utf8_trim_whitespace(batch.column(names.index("uri")))
    size = _sizes(batch.column(names.index("size")) if "size" in names else None, n)
    version = batch.column(names.index("version")) if "version" in names else None
    return _rows(uri, size, _tagged("version:", version, n))


def _inventory_rows(batch: pa.RecordBatch, *, url_encoded: bool) -> pa.Table:
    """An inventory's batch -> the same columns, the version being ``etag:<ETag>``.

    An inventory of all versions lists every version and delete marker of a key: only rows
    with ``IsLatest`` true and ``IsDeleteMarker`` not true are kept (a key whose latest
    version is a delete marker is gone). An empty ``Size`` is unknown (0).
    """
    columns = {_field_of(name): batch.column(i) for i, name in enumerate(batch.schema.names)}
    keep = None
    if "IsLatest" in columns:
        keep = _is_true(columns["IsLatest"])
    if "IsDeleteMarker" in columns:
        live = pc.invert(_is_true(columns["IsDeleteMarker"]))
        keep = live if keep is None else pc.and_(keep, live)
    if keep is not None:
        batch = batch.filter(keep)
        columns = {_field_of(name): batch.column(i) for i, name in enumerate(batch.schema.names)}
    n = batch.num_rows
    key = columns["Key"].cast(pa.string())
    if url_encoded:  # CSV inventories URL-encode object keys
        key = _url_decoded(key)
    uri = pc.binary_join_element_wise("s3://", columns["Bucket"], "/", key, "")
    etag = columns.get("ETag")
    if etag is not None:
        etag = pc.utf8_trim(etag.cast(pa.string()), '"')
    return _rows(uri, _sizes(columns.get("Size"), n), _tagged("etag:", etag, n))


def _rows(uri: Any, size: pa.Array, version: pa.Array) -> pa.Table:
    return pa.table({"uri": uri, "file_size": size, "source_version": version})


def _is_true(values: pa.Array) -> pa.Array:
    """A boolean column, or CSV text (``true``/``false``), as booleans; null is false."""
    if pa.types.is_boolean(values.type):
        return pc.fill_null(values, False)
    text = pc.utf8_lower(pc.utf8_trim_whitespace(values.cast(pa.string())))
    return pc.fill_null(pc.equal(text, "true"), False)


def _sizes(size: pa.Array | None, n: int) -> pa.Array:
    """Sizes as int64; missing or empty (a CSV's ``""``) is unknown: 0."""
    if size is None:
        return pa.array([0] * n, pa.int64())
    if pa.types.is_string(size.type) or pa.types.is_large_string(size.type):
        text = pc.utf8_trim_whitespace(size)
        size = pc.if_else(pc.equal(text, ""), pa.scalar(None, size.type), text)
    return pc.fill_null(size.cast(pa.int64()), 0)


def _tagged(tag: str, values: pa.Array | None, n: int) -> pa.Array:
    """``tag + value`` where a value is given, else ``""``."""
    if values is None:
        return pa.array([""] * n, pa.string())
    values = pc.fill_null(values.cast(pa.string()), "")
    return pc.if_else(pc.equal(values, ""), "", pc.binary_join_element_wise(tag, values, ""))


def _url_decoded(keys: pa.Array) -> pa.Array:
    """S3 Inventory's CSV keys are URL-encoded (``+`` for a space): decode the ones that hold
    an escape; the rest, nearly all keys, are not touched in Python."""
    escaped = pc.or_(pc.match_substring(keys, "%"), pc.match_substring(keys, "+"))
    rows = pc.indices_nonzero(pc.fill_null(escaped, False)).to_pylist()
    if not rows:
        return keys
    values = keys.to_pylist()
    for i in rows:
        values[i] = unquote(values[i].replace("+", " "))
    return pa.array(values, pa.string())


def list_tables(
    list_uri: str, input_uri: str, storage_options: Mapping[str, Any] | None = None
) -> Iterator[pa.Table]:
    """The list's ``LIST_SCHEMA`` tables, read in this process (a dry run, a small run's
    probe); a run reads them with Ray Data (:func:`pipeline.feed.read_list`)."""
    yield from InputList.open(list_uri, input_uri, storage_options).tables()
