"""Stage 1 into Ray: the listing streams into the running plan while it goes on.

    driver thread: list pages -> diff (incremental) -> Feed.put(new images)   (bounded queue)
    read tasks:    Feed.get() -> listing blocks -> decode -> model -> writers

The driver holds no listing beyond the chunks in flight (``FEED_CHUNKS`` in the feed actor)
and no object ref per chunk. Ray Data hands a read task's output on in blocks of
``DataContext.target_max_block_size``, which the plan lowers to ``plan.PLAN_BLOCK_BYTES``
(32 MiB: some 197,000 listing rows), so decoding starts once the listing has found that many
new images, or has ended: a constant, whatever the input's size. The books (counts, known
failures, deletions) are complete once the listing is, which is before the last block can be
written, so the commit reads them then.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from ray.data.block import Block, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import PipelineError
from pipeline.incremental import NewImages, list_work
from pipeline.inventory import LIST_SCHEMA, InputList, ListFile
from pipeline.listing import LISTING_SCHEMA, InputError
from pipeline.probe import probe_chunk
from pipeline.progress import driver_actor

if TYPE_CHECKING:
    from pipeline.checks import Run
    from pipeline.manifest import Manifest
    from pipeline.sink import RunSink

logger = logging.getLogger(__name__)

# Chunks (of ``LISTING_BLOCK_ROWS`` new images) the feed holds before the lister waits.
FEED_CHUNKS = 64
# Read tasks emptying the feed: one hands on a chunk in about a millisecond, faster than
# the listing finds them; each more would hold a block of its own before handing it on.
FEED_READERS = 1
# New images the listing may feed beyond those written: a bound on the listing rows held in
# Ray's object store (the feed read's blocks and their splits run ahead of a slow model
# stage by up to ``TASK_BLOCKS_AHEAD`` blocks each). Well above the rows of one read block
# (``PLAN_BLOCK_BYTES`` of listing rows), which must fill before any of them can be written.
LISTING_AHEAD = 2_000_000
# Read tasks at once over an --input-list's files: each streams one file, a batch at a time.
LIST_READERS = 8


class Feed:
    """A bounded queue of listing chunks between the driver and the read tasks (an actor)."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[pa.Table | str | None] = asyncio.Queue(maxsize)

    async def put(self, chunk: pa.Table) -> None:
        await self.queue.put(chunk)

    async def get(self) -> pa.Table | str | None:
        """The next chunk; ``None`` once the listing is done; a string: why it failed."""
        return await self.queue.get()

    async def close(self, readers: int, error: str | None = None) -> None:
        for _ in range(readers):
            await self.queue.put(error)

    async def stop(self, readers: int) -> None:
        """End the feed now: the chunks not yet read are dropped."""
        while not self.queue.empty():
            self.queue.get_nowait()
        await self.close(readers)


class _UnsizedDatasource(Datasource):
    """A datasource whose blocks' rows and bytes are known only as its read tasks make them."""

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    @staticmethod
    def _read_tasks(reads: Sequence[Callable[[], Any]], schema: pa.Schema) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(read, metadata, schema=schema) for read in reads]


class FeedDatasource(_UnsizedDatasource):
    """``FEED_READERS`` read tasks, each yielding the feed's chunks as blocks until it closes."""

    def __init__(self, feed: Any, readers: int = FEED_READERS) -> None:
        self.feed, self.readers = feed, readers

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        feed = self.feed
        return self._read_tasks([lambda: read_feed(feed)] * self.readers, LISTING_SCHEMA)


def read_feed(feed: Any) -> Iterator[Block]:
    import ray

    while True:
        chunk = ray.get(feed.get.remote())
        if chunk is None:
            return
        if isinstance(chunk, str):
            raise PipelineError(f"listing failed: {chunk}")
        yield chunk


class StreamedListing:
    """The driver's side: a thread that lists and diffs, putting new images into the feed.

    Args:
        listing: Lists and diffs the input, calling its ``keep`` argument with each chunk of
            new images (:func:`pipeline.incremental.list_work`).
        ahead: New images fed beyond those written (``written``) before the listing waits
            (default ``LISTING_AHEAD``).
    """

    def __init__(
        self,
        listing: Callable[[Callable[[pa.Table], None]], NewImages],
        ahead: int | None = None,
        first: pa.Table | None = None,
    ) -> None:
        self.feed: Any = driver_actor(Feed, FEED_CHUNKS)
        self.readers = FEED_READERS
        self.queued = 0  # new images handed to the feed so far
        self.ahead = LISTING_AHEAD if ahead is None else ahead
        self.written: Callable[[], int] = lambda: 0  # images written so far (the run's sink)
        self._cancelled = threading.Event()
        self._stopped = threading.Event()  # the feed was ended early (a drain)
        self._listing = listing
        self._first_rows = first  # fed before the first chunk of new images (the probe)
        self._first = threading.Event()  # a chunk was fed, or the listing ended
        self._result: NewImages | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="listing", daemon=True)

    def start(self) -> bool:
        """Start listing; True once a chunk of new images is fed, False if the listing
        ended without one (the books are then complete: see :meth:`result`)."""
        self._thread.start()
        self._first.wait()
        return self.queued > 0

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def failed(self) -> bool:
        """Whether the listing ended on an error of its own (not on :meth:`cancel`)."""
        stopped = self._cancelled.is_set() or self._stopped.is_set()
        return self.done and self._error is not None and not stopped

    def datasource(self) -> FeedDatasource:
        return FeedDatasource(self.feed, self.readers)

    def result(self) -> NewImages:
        """Wait for the listing; its books, or the error that stopped it."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop the listing (if it still runs) and end the feed actor: a waiting ``put``
        fails, and a finished run leaves no actor behind."""
        import ray

        self._cancelled.set()
        ray.kill(self.feed)
        self._thread.join(timeout=30)

    def stop_feeding(self) -> None:
        """End the feed now (a drain): the read tasks end once they take what is in flight,
        the chunks queued are dropped, and the listing stops (its result raises)."""
        import ray

        self._stopped.set()
        try:
            ray.get(self.feed.stop.remote(self.readers))
        except ray.exceptions.RayError:
            pass  # cancelled: the feed is gone

    def _keep(self, chunk: pa.Table) -> None:
        import ray

        while not self._stopped.is_set() and self.queued - self.written() >= self.ahead:
            if self._cancelled.wait(0.1):
                raise PipelineError("listing cancelled")
        if self._stopped.is_set():
            raise PipelineError("listing stopped: the run is draining")
        if self._first_rows is not None:
            ray.get(self.feed.put.remote(self._first_rows))
            self._first_rows = None
        ray.get(self.feed.put.remote(chunk))
        self.queued += chunk.num_rows
        self._first.set()

    def _run(self) -> None:
        import ray

        error = None
        try:
            self._result = self._listing(self._keep)
        except BaseException as exc:  # raised to the caller by result()
            self._error, error = exc, str(exc) or type(exc).__name__
        finally:
            self._first.set()
            try:
                # A stopped feed has ended already: no error for its readers.
                error = None if self._stopped.is_set() else error
                ray.get(self.feed.close.remote(self.readers, error))
            except ray.exceptions.RayError:
                pass  # cancelled: the feed is gone


class ListDatasource(_UnsizedDatasource):
    """An ``--input-list``'s files, one read task each (:class:`pipeline.inventory.InputList`)."""

    def __init__(self, listed: InputList) -> None:
        self.listed = listed

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        reads = [ReadListFile(self.listed, entry) for entry in self.listed.files]
        return self._read_tasks(reads, LIST_SCHEMA)


@dataclasses.dataclass(frozen=True)
class ReadListFile:
    """A read task's function (:class:`ListDatasource`): pickled as a reference to this class
    and its fields, so it runs this module's code where Ray puts it."""

    listed: InputList
    entry: ListFile

    def __call__(self) -> Iterator[pa.Table]:
        return self.listed.read(self.entry)


def read_list(listed: InputList) -> Iterator[pa.Table]:
    """An ``--input-list``'s ``LIST_SCHEMA`` tables, read by Ray Data: a task per list file,
    in the list's order; a read task's ``InputError`` comes back as one line."""
    import ray

    dataset = ray.data.read_datasource(
        ListDatasource(listed),
        override_num_blocks=len(listed.files),
        concurrency=min(LIST_READERS, len(listed.files)),
        # Parsing a list file is light next to decoding an image: the read tasks reserve
        # no CPU (the ones the decode tasks and model actors reserve stay theirs), and
        # Ray Data's backpressure, not a reservation, bounds how far ahead they read.
        num_cpus=0,
    )
    # --limit takes the first entries: the order of a list must not depend on timing.
    dataset.context.execution_options.preserve_order = True
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, InputError):
            raise InputError(str(exc.cause)) from None
        raise


def start_listing(
    run: Run, base: Manifest | None, resume: bool, probed: NewImages | None = None
) -> tuple[NewImages, StreamedListing | None]:
    """The run's listing: a probe's (``probed``: its chunks go to the object store now), or
    one started now against ``base`` (:func:`~pipeline.checks.diff_base`) in a driver thread,
    streaming into the plan: the run starts with its first chunk of new images. A listing
    that ends without one is settled at once: its books, and no stream. A streamed listing's
    books are empty until it ends (the sink takes them then)."""
    import ray

    # The probe's stored images go first, once there is anything new to embed.
    first = probe_chunk(run.probes) if run.probes else None
    if probed is not None:
        chunks = [first, *probed.refs] if first is not None and probed.refs else probed.refs
        listing = dataclasses.replace(probed, refs=[ray.put(chunk) for chunk in chunks])
        return listing, None
    streamed = StreamedListing(
        lambda keep: list_work(run, base, keep=keep, pending=resume, read_list=read_list),
        first=first,
    )
    if streamed.start():
        return NewImages.empty(), streamed
    try:  # nothing new: the books are complete already
        return streamed.result(), None
    finally:
        streamed.cancel()


@contextlib.contextmanager
def feeding(
    listing: NewImages, streamed: StreamedListing | None, sink: RunSink
) -> Iterator[tuple[Any, int | Callable[[], int | None]]]:
    """The plan's source and its total: a probe's chunks, or a listing that goes on while
    the plan runs, whose own error is the one raised if it fails."""
    if streamed is None:
        yield listing.refs, listing.to_embed
        return
    sink.listing_done = streamed.result
    streamed.written = lambda: sink.rows_written

    def total() -> int | None:
        return streamed.result().to_embed if streamed.done else None

    sink.stop_feeding = streamed.stop_feeding
    try:
        yield streamed.datasource(), total
    except BaseException:
        failed = streamed.failed  # before the cancel: then a waiting listing fails too
        streamed.cancel()
        if failed:
            streamed.result()  # the listing's own error is the one raised
        raise
    streamed.cancel()  # done: the feed actor goes
