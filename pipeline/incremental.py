"""Incremental runs: which listed images the committed tables already hold, and which are gone.

An image is identified by its URI and versioned by ``(file_size, source_version)``, where the
version is the store's ETag or the file's mtime. A run embeds only images whose key is not in
the current table; a changed image gets a new row in the new run, and readers keep the latest
row per URI (:mod:`pipeline.current`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.current import CommittedImages
from pipeline.failures import Failures, count_failures, failures_by_type
from pipeline.inventory import InputList
from pipeline.listing import IMAGE_EXTENSIONS, InputError, ListingCounts, list_images
from pipeline.manifest import Manifest
from pipeline.read import committed_images

if TYPE_CHECKING:
    from pipeline.checks import Run

logger = logging.getLogger(__name__)

# Listing rows per chunk: the unit of the diff, and of the new images fed to the plan (which
# re-splits them into decode-sized blocks). Each chunk costs the diff a fixed time besides its
# rows, which larger chunks spread; past a few thousand rows the gain is small
# (``bench.scale diff`` measures it).
LISTING_BLOCK_ROWS = 4096


@dataclasses.dataclass
class NewImages:
    """What a run has to embed: listing chunks in the object store, and the books on the rest."""

    refs: list[Any]
    counts: ListingCounts
    unchanged: int
    known_failures: dict[str, Failures]
    deleted: pa.Array
    complete: bool = True  # False: stopped at max_listed, the rest not listed
    # Of ``known_failures``, those of runs whose verdict refused them: they count again.
    unaccepted_failures: dict[str, Failures] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls) -> NewImages:
        """No images, no books: a streamed listing's until it ends."""
        return cls(
            refs=[],
            counts=ListingCounts(),
            unchanged=0,
            known_failures={},
            deleted=pa.array([], pa.string()),
        )

    @property
    def known_failed(self) -> int:
        return count_failures(self.known_failures)

    @property
    def to_embed(self) -> int:
        return self.counts.listed - self.counts.duplicates - self.unchanged - self.known_failed


def list_work(
    run: Run,
    table: Manifest | None,
    *,
    keep: Callable[[pa.Table], Any] | None,
    max_listed: int | None = None,
    pending: bool = False,
    read_list: Callable[[InputList], Iterator[pa.Table]] = InputList.tables,
) -> NewImages:
    """List the run's input against the current tables ``table`` lists (``None``: embed
    everything; ``pending``: against a killed ``--full`` run's pending files, which this one
    resumes); :func:`list_new_images` says what ``keep`` and ``max_listed`` do.

    An ``--input-list`` is read by ``read_list``: in this process by default (a dry run, or a
    small run's probe, which start no Ray); a run reads it with Ray Data
    (:func:`pipeline.feed.read_list`).

    Raises:
        InputError: the input holds no image.
    """
    config, source = run.config, run.input
    listing = list_new_images(
        source.fs,
        source.root,
        # Only the index is kept: the tables it was built from go before the listing starts.
        known=(committed_images(run.output, table, pending=pending) if table is not None else None),
        keep=keep,
        limit=config.limit,
        max_listed=max_listed,
        concurrency=config.list_concurrency,
        tables=None if source.list is None else read_list(source.list),
    )
    counts = listing.counts
    if counts.listed == 0:
        raise InputError(
            f"no images under {source.uri} ({counts.skipped_by_extension} other files "
            f"skipped; images end in .{', .'.join(sorted(IMAGE_EXTENSIONS))})"
        )
    # DEBUG: the progress display and the summary say the same.
    logger.debug(
        "listed %d images under %s: %d new or changed, %d unchanged, %d known failed, "
        "%d gone, %d skipped",
        counts.listed,
        source.uri,
        listing.to_embed,
        listing.unchanged,
        listing.known_failed,
        len(listing.deleted),
        counts.skipped_by_extension,
    )
    return listing


def list_new_images(
    fs: Any,
    root: str,
    *,
    known: CommittedImages | None,
    keep: Callable[[pa.Table], Any] | None,
    limit: int | None = None,
    max_listed: int | None = None,
    concurrency: int = 1,
    tables: Iterable[pa.Table] | None = None,
) -> NewImages:
    """List the input and keep what the committed tables do not already hold.

    Each kept chunk goes to the object store as it is listed, so the driver holds one chunk of
    the listing at a time, plus the current table's keys (``known``) when there is one.

    Args:
        fs: The input's filesystem.
        root: The input's path on it.
        known: The current tables' keys, indexed (:class:`CommittedImages`), or ``None``
            to embed everything (``--full``, or a new output).
        keep: Where each chunk of new images goes as it is listed (``ray.put``: the run's
            refs); ``None`` counts them only (a dry run).
        limit: List at most this many images; a limited listing records no deletions.
        max_listed: Give up once this many images are listed and more may follow
            (``complete`` is then False).
        concurrency: LIST requests in flight at once, on object stores.
        tables: The input's files from an ``--input-list`` instead of listing ``root``
            (:func:`pipeline.inventory.list_tables`).
    """
    counts = ListingCounts()
    chunks = list_images(
        fs,
        root,
        counts,
        chunk_rows=LISTING_BLOCK_ROWS,
        limit=limit,
        concurrency=concurrency,
        tables=tables,
    )
    return diff_listing(
        chunks,
        counts,
        known=known,
        keep=keep,
        limited=limit is not None,
        max_listed=max_listed,
        unique=UriSet() if tables is not None else None,
    )


def diff_listing(
    chunks: Iterable[pa.Table],
    counts: ListingCounts,
    *,
    known: CommittedImages | None,
    keep: Callable[[pa.Table], Any] | None,
    limited: bool = False,
    max_listed: int | None = None,
    unique: UriSet | None = None,
) -> NewImages:
    """Diff listing chunks, as they come, against the committed tables (see
    :func:`list_new_images`); ``counts`` is the lister's, read as it goes.

    Each chunk costs time in proportion to its own rows: the committed keys are indexed
    once (``known``). ``keep``'s non-``None`` results become ``refs``. ``unique``: drop the
    rows whose URI an earlier row had (an input list may name a URI twice; a listing of a
    folder or prefix cannot), counted in ``counts.duplicates``.
    """
    known = known or CommittedImages.empty()
    refs, unchanged, failed_rows, complete = [], 0, [], True
    for chunk in chunks:
        if max_listed is not None and counts.listed > max_listed:
            complete = False
            break
        if unique is not None:
            first = unique.add(chunk["uri"])
            if not first.all():
                counts.duplicates += int((~first).sum())
                chunk = chunk.filter(pa.array(first))
        diff = known.diff(chunk)
        unchanged += diff.unchanged
        if len(diff.known_failed_rows):
            failed_rows.append(diff.known_failed_rows)
        if diff.new.num_rows and keep is not None:
            kept = keep(diff.new)
            if kept is not None:
                refs.append(kept)
    # Only a complete listing can tell that an image is gone.
    full_listing = not limited and complete
    deleted = known.unseen() if full_listing else pa.array([], pa.large_string())
    failed = np.concatenate([np.zeros(0, np.int64), *failed_rows])
    known_columns = known.failure_columns(failed)
    unaccepted_columns = known.failure_columns(failed[known.refused[failed]])
    return NewImages(
        refs=refs,
        counts=counts,
        unchanged=unchanged,
        known_failures=failures_by_type(*known_columns),
        deleted=deleted,
        complete=complete,
        unaccepted_failures=failures_by_type(*unaccepted_columns),
    )


class UriSet:
    """The URIs seen so far, by two independent 64-bit hashes (16 bytes a URI, no strings
    kept): :meth:`add` says which of a batch are seen for the first time.

    Sorted runs of hashes are merged as they double in size (a log-structured merge), so a
    batch costs ``O(n log N)`` lookups and each hash is merged ``O(log N)`` times. Runs are
    sorted by the first hash, plain ``uint64`` arrays, with the second beside it. Two URIs
    would be taken for one only if both their hashes collided (some 1e-20 for a billion).

    Example:
        >>> seen = UriSet()
        >>> seen.add(pa.array(["a", "b", "a"])).tolist(), seen.add(pa.array(["b", "c"])).tolist()
        ([True, True, False], [False, True])
    """

    _SECOND_KEY = "embed-images-2nd"  # pandas' hash_key: 16 bytes

    def __init__(self) -> None:
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []  # (h1 sorted, h2), each run

    @property
    def nbytes(self) -> int:
        return sum(h1.nbytes + h2.nbytes for h1, h2 in self.levels)

    def add(self, uris: pa.Array | pa.ChunkedArray) -> np.ndarray:
        from pandas.util import hash_array

        values = pc.cast(uris, pa.large_string()).to_numpy(zero_copy_only=False)
        h1 = hash_array(values, categorize=False)
        h2 = hash_array(values, hash_key=self._SECOND_KEY, categorize=False)
        first = np.ones(len(values), dtype=bool)
        # Within the batch: the first occurrence of each (h1, h2).
        order = np.lexsort((np.arange(len(values)), h2, h1))
        same = (h1[order][1:] == h1[order][:-1]) & (h2[order][1:] == h2[order][:-1])
        first[order[1:][same]] = False
        # Against the earlier batches.
        for seen1, seen2 in self.levels:
            first &= ~_contains(seen1, seen2, h1, h2)
        new1, new2 = h1[first], h2[first]
        while self.levels and len(self.levels[-1][0]) <= len(new1):
            old1, old2 = self.levels.pop()
            new1, new2 = np.concatenate([old1, new1]), np.concatenate([old2, new2])
        by_h1 = np.argsort(new1, kind="stable")
        self.levels.append((new1[by_h1], new2[by_h1]))
        return first


def _contains(seen1: np.ndarray, seen2: np.ndarray, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """Which ``(h1, h2)`` pairs a run sorted by ``seen1`` holds (equal first hashes sit side by
    side: each is checked, a rare loop)."""
    found = np.zeros(len(h1), dtype=bool)
    if len(seen1) == 0:
        return found
    at = np.searchsorted(seen1, h1)
    while True:
        inside = at < len(seen1)
        candidates = np.flatnonzero(inside)
        if candidates.size == 0:
            return found
        place = at[candidates]
        same1 = seen1[place] == h1[candidates]
        found[candidates[same1 & (seen2[place] == h2[candidates])]] = True
        # Only a first hash shared by two URIs needs the next place looked at.
        again = candidates[same1 & ~found[candidates]]
        if again.size == 0:
            return found
        at = np.full(len(h1), len(seen1), dtype=at.dtype)
        at[again] = place[same1 & ~found[candidates]] + 1
