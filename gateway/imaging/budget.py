"""The resource budget: what one request, and the whole process, may hold at once.

Every path that decodes pixels, reads a whole data set or receives an instance asks here
before it allocates:

- ``ByteBudget``: bytes held at once by one kind of work across the process (the decode
  memory; the ingest bytes in flight of every STOW-RS and C-STORE reception). A request
  larger than the whole budget is refused at once (413); one that does not fit now waits
  at most ``wait_seconds``, then is refused as busy (503 with Retry-After).
- ``DecodePool``: the one bounded pool every decode runs in (render, frames, transcode,
  metadata, de-identification), off the event loop; a free worker is waited for at most
  ``wait_seconds``.
- the estimates, from the header, before anything is decoded: decoded bytes of a frame,
  the bytes a whole read of a data set holds (a deflated one is measured by inflating it
  as a stream, never in memory), the cost of rendering a frame.

A refusal is an ``OverBudget``: status, reason (the metric label), a message for the
client, ``Retry-After`` when waiting may help; it is logged and counted when made.
"""

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, TypeVar

import anyio
import anyio.to_thread
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from gateway import metrics
from gateway.shared_tally import SharedTally
from storage.part10 import read_file_meta
from storage.structure import (
    DEFER_SIZE,
    DatasetShape,
    DatasetTooComplexError,
    DatasetTooLargeError,
    IngestLimits,
    UnreadableDatasetError,
    check_structure,
    inflate,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
MIB = 1 << 20
# Working memory of the render pipeline per source pixel, beyond the decoded frame: the
# stored values and the lookup indices (up to 32 bits each), numpy's index copy in bincount
# (64 bits), the display image. Measured with tracemalloc on a 2048x2048 16-bit frame,
# frame included: 12 bytes a pixel unsigned, 15 signed; estimated here: 2 + 16.
RENDER_BYTES_PER_PIXEL = 16
# Per output pixel of a resized image: the image and Pillow's intermediate pass (RGBX).
OUTPUT_BYTES_PER_PIXEL = 8
# What a header read and its DICOM JSON build, per thing a walk of the data set counts
# (tracemalloc, pydicom 3.0): 756 bytes an element, 1 420 an item (element included),
# 480-550 a value of a multi-valued text element (DS, IS, UI...); text about 7 times its
# bytes (decoded, then inlined in the JSON); binary values once, or as BulkDataURI.
HEADER_BYTES_PER_ELEMENT, HEADER_BYTES_PER_ITEM, HEADER_BYTES_PER_VALUE = 800, 700, 560
HEADER_TEXT_FACTOR, HEADER_BINARY_FACTOR = 8, 2
_SHARED_POLL = 0.02  # seconds between two looks at a budget shared with other processes


class OverBudget(Exception):  # noqa: N818 (a refusal, not a bug: named as the API says)
    """A request refused by the resource budget, with the HTTP status that says why."""

    def __init__(self, status: int, reason: str, message: str,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


def refuse(status: int, reason: str, message: str, retry_after: int | None = None
           ) -> OverBudget:
    """An ``OverBudget`` to raise, logged and counted
    (``passerelle_budget_refusals_total{reason}``)."""
    log.warning("refused over budget (%s): %s", reason, message)
    metrics.BUDGET_REFUSALS.labels(reason).inc()
    return OverBudget(status, reason, message, retry_after)


class ByteBudget:
    """Bytes that one kind of work may hold at once across the process; thread-safe.

    ``wait_seconds`` > 0 makes ``reserve`` block that long for room: use it from worker
    threads only, never on the event loop.
    """

    def __init__(self, name: str, setting: str, capacity: int,
                 wait_seconds: float = 0.0, min_bytes_per_minute: int = 0,
                 shared: SharedTally | None = None) -> None:
        self.name = name
        self.setting = setting  # named in refusals, so an operator knows what to raise
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        # A reservation that grows by less in a minute is refused (408): a reception that
        # trickles a byte now and then would hold its bytes for as long as it likes.
        self.min_bytes_per_minute = min_bytes_per_minute
        # Set: the capacity is shared with the other processes of the service, each holding
        # its own count in the tally (gateway.shared_tally).
        self.shared = shared
        self._used = 0  # by this process
        self._room = threading.Condition()
        # Sizes of reservations the garbage collector dropped unreleased: given back by the
        # next call that holds the locks (``__del__`` may run inside any of them).
        self._dropped: collections.deque[int] = collections.deque()
        self._gauge = metrics.BUDGET_IN_USE.labels(name)
        self._gauge.set(0)

    @property
    def in_use(self) -> int:
        """Bytes reserved right now by this process."""
        with self._room:
            self._reclaim_dropped()
            return self._used

    def _reclaim_dropped(self) -> None:
        """Give back what dropped reservations held (call holding ``_room``)."""
        if not self._dropped:
            return
        while self._dropped:
            self._used -= self._dropped.popleft()
        if self.shared is not None:
            self.shared.try_hold(self._used, self.capacity)
        self._gauge.set(self._used)
        self._room.notify_all()

    def _fits(self, size: int) -> bool:
        """True (and, when shared, the tally updated) when ``size`` more bytes fit now."""
        if self.shared is None:
            return self._used + size <= self.capacity
        return self.shared.try_hold(self._used + size, self.capacity)

    def _in_use_everywhere(self) -> int:
        return self._used if self.shared is None else self.shared.total()

    def reserve(self, size: int, what: str = "this request") -> "Reservation":
        """Reserve ``size`` bytes for ``what`` (a context manager that releases them);
        OverBudget 413 when it can never fit, 503 when there is no room in time."""
        reservation = Reservation(self, what)
        reservation.resize(size)
        return reservation

    def _take(self, size: int, held: int, what: str) -> None:
        if held + size > self.capacity:
            raise refuse(413, self.name, f"{what} needs {_mib(held + size)} of {self.name}, "
                         f"more than the {_mib(self.capacity)} the service allows "
                         f"({self.setting})")
        deadline = time.monotonic() + self.wait_seconds
        # In the decode pool, the wait for a worker and the wait for room share one
        # deadline: a request waits decode_wait_seconds in all, never twice that.
        deadline = min(deadline, getattr(_JOB, "deadline", deadline))
        with self._room:
            self._reclaim_dropped()
            while not self._fits(size):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise refuse(503, f"{self.name}_busy",
                                 f"the service is busy ({self.name}: "
                                 f"{_mib(self._in_use_everywhere())} of "
                                 f"{_mib(self.capacity)} in use); retry shortly",
                                 retry_after=1)
                # Room given back by another process is not notified here: look again soon.
                self._room.wait(left if self.shared is None else min(left, _SHARED_POLL))
                self._reclaim_dropped()
            self._used += size
            self._gauge.set(self._used)

    def _give_back(self, size: int) -> None:
        with self._room:
            self._reclaim_dropped()
            self._used -= size
            if self.shared is not None:
                self.shared.try_hold(self._used, self.capacity)
            self._gauge.set(self._used)
            self._room.notify_all()


class Reservation:
    """Bytes held from a ``ByteBudget`` until ``release`` (or the end of a ``with``)."""

    def __init__(self, budget: ByteBudget, what: str) -> None:
        self.budget = budget
        self.what = what
        self.size = 0
        self._minute = (time.monotonic(), 0)  # start and size of the current minute

    def resize(self, size: int) -> None:
        """Hold ``size`` bytes in all (grow: may raise OverBudget; shrink: gives back)."""
        if size > self.size and self.budget.min_bytes_per_minute:
            self._check_pace(size)
        if size > self.size:
            self.budget._take(size - self.size, self.size, self.what)
        elif size < self.size:
            self.budget._give_back(self.size - size)
        self.size = size

    def release(self) -> None:
        """Give everything back (idempotent)."""
        self.resize(0)

    def _check_pace(self, size: int) -> None:
        started, at_start = self._minute
        now = time.monotonic()
        if now - started < 60:
            return
        if size - at_start < self.budget.min_bytes_per_minute:
            self.release()
            raise refuse(408, f"{self.budget.name}_too_slow",
                         f"{self.what} brought {_mib(size - at_start)} in "
                         f"{now - started:.0f} s, less than the "
                         f"{_mib(self.budget.min_bytes_per_minute)} a minute asked "
                         "(reception_min_bytes_per_minute)")
        self._minute = (now, size)

    def __enter__(self) -> "Reservation":
        return self

    def __del__(self) -> None:
        # A reservation dropped unreleased (a streamed response that never started) must
        # not shrink the budget for good. No lock here: the collector may run this in a
        # thread holding the budget's or the tally's, which would then wait on itself.
        if self.size:
            self.budget._dropped.append(self.size)
            self.size = 0

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


class DecodePool:
    """The bounded pool every decode runs in, off the event loop."""

    def __init__(self, workers: int, wait_seconds: float) -> None:
        self.workers = workers
        self.wait_seconds = wait_seconds
        # Admission is waited for with a deadline; the thread limiter, of the same size,
        # is then always free (anyio's run_sync cannot wait for its limiter with one).
        self._admission = anyio.Semaphore(workers)
        self._threads = anyio.CapacityLimiter(workers)

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in a pool thread; OverBudget 503 when no worker is free
        within ``wait_seconds`` (the reservations it makes wait no longer in all)."""
        deadline = time.monotonic() + self.wait_seconds
        try:
            self._admission.acquire_nowait()  # a free worker, even with no time to wait
            admitted = True
        except anyio.WouldBlock:
            admitted = False
            with anyio.move_on_after(self.wait_seconds):
                await self._admission.acquire()
                admitted = True
        if not admitted:
            raise refuse(503, "decode_workers_busy",
                         f"the service is busy (decode_workers: {self.workers} of "
                         f"{self.workers} in use); retry shortly", retry_after=1)
        try:
            return await anyio.to_thread.run_sync(functools.partial(_job, deadline, function,
                                                                    *args),
                                                  limiter=self._threads)
        finally:
            self._admission.release()


_JOB = threading.local()  # the deadline of the decode a pool thread runs


def _job(deadline: float, function: Callable[..., T], *args: object) -> T:
    _JOB.deadline = deadline
    try:
        return function(*args)
    finally:
        del _JOB.deadline


class ResourceBudget:
    """The process's budget: decode pool and memory, ingest bytes, per-request bounds. With
    tallies, the decode memory and the ingest bytes are shared with the other processes of
    the service (each tally's capacity holds for all of them together)."""

    def __init__(self, decode_workers: int, decode_memory_bytes: int,
                 decode_wait_seconds: float, max_output_pixels: int,
                 ingest_bytes_in_flight: int, max_parts_per_request: int,
                 part_overhead_bytes: int, reception_min_bytes_per_minute: int,
                 scratch: Callable[[], BinaryIO] | None = None,
                 memory_tally: SharedTally | None = None,
                 ingest_tally: SharedTally | None = None) -> None:
        self.scratch = scratch  # where a deflated data set is inflated to be walked
        self.decode = DecodePool(decode_workers, decode_wait_seconds)
        self.memory = ByteBudget("decode_memory", "decode_memory_bytes", decode_memory_bytes,
                                 decode_wait_seconds, shared=memory_tally)
        # Receptions never wait for room: the event loop (STOW-RS) and the DICOM threads
        # refuse at once, and the sender retries.
        self.ingest = ByteBudget("ingest_bytes", "ingest_bytes_in_flight",
                                 ingest_bytes_in_flight,
                                 min_bytes_per_minute=reception_min_bytes_per_minute,
                                 shared=ingest_tally)
        self.max_output_pixels = max_output_pixels
        self.max_parts_per_request = max_parts_per_request
        self.part_overhead_bytes = part_overhead_bytes

    def reserve_header_read(self, path: Path, as_json: bool = False) -> "Reservation":
        """Reserve the decode memory a header-only read (``stop_before_pixels``) of ``path``
        builds (read with ``defer_size=DEFER_SIZE``), or with its DICOM JSON ``as_json``,
        estimated from a walk of its data set up to the pixel data (elements, items,
        values, bytes: the JSON of a 9 MB object of 5 million DS values takes 2 GiB), plus
        the whole inflated data set of a deflated file (pydicom inflates it whole), as the
        walk inflated it. Blocking: call it in the decode pool."""
        # Deep enough for what ingest accepts (max_sequence_depth), shallow enough for the
        # walk's recursion; no other limit: what is counted is reserved.
        limits = IngestLimits(self.memory.capacity, _UNCOUNTED, _READ_DEPTH, _UNCOUNTED)
        try:
            with path.open("rb") as stored:
                shape = check_structure(stored, limits, self.scratch, stop_at_pixels=True)
        except (DatasetTooLargeError, DatasetTooComplexError) as exc:
            raise refuse(413, "decode_memory", f"reading this header: {exc}, past the "
                         "decode budget (decode_memory_bytes)") from exc
        need = header_read_bytes(shape, as_json) + shape.inflated_bytes
        return self.memory.reserve(need, "reading this header")

    def whole_read_bytes(self, path: Path) -> int:
        """``whole_read_bytes`` of ``path``, measured up to the decode memory."""
        return whole_read_bytes(path, self.memory.capacity)


_UNCOUNTED = 1 << 62
_READ_DEPTH = 100


def header_read_bytes(shape: DatasetShape, as_json: bool) -> int:
    """Memory a header read builds from a data set of ``shape``: read with
    ``defer_size=DEFER_SIZE`` (values as read, as bytes; long binary values left on disk),
    or ``as_json`` (every value read and converted, DICOM JSON made of them)."""
    structure = shape.elements * HEADER_BYTES_PER_ELEMENT + shape.items * HEADER_BYTES_PER_ITEM
    if not as_json:
        return structure + shape.text_bytes + shape.binary_bytes
    return (structure + shape.values * HEADER_BYTES_PER_VALUE
            + shape.text_bytes * HEADER_TEXT_FACTOR
            + (shape.binary_bytes + shape.deferred_bytes) * HEADER_BINARY_FACTOR)


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB" if size < 10 * MIB else f"{size // MIB} MiB"


def frame_bytes(ds: Dataset) -> int:
    """Decoded bytes of one frame, from the header: Rows x Columns x SamplesPerPixel x
    the bytes of a sample once decoded (1-bit samples decode to one byte each)."""
    sample = max(1, (int(ds.get("BitsAllocated") or 8) + 7) // 8)
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * sample


def render_bytes(ds: Dataset, resized_pixels: int) -> int:
    """Memory the rendering of one frame of ``ds`` holds at its peak; ``resized_pixels``:
    the output's pixels when it is resized, else 0."""
    pixels = int(ds.Rows) * int(ds.Columns)
    return frame_bytes(ds) + pixels * RENDER_BYTES_PER_PIXEL + \
        resized_pixels * OUTPUT_BYTES_PER_PIXEL


def is_deflated(path: Path) -> bool:
    """True when the file's data set is deflated (pydicom inflates it whole to read any
    of it, even the header)."""
    with path.open("rb") as stored:
        return read_file_meta(stored).transfer_syntax == DeflatedExplicitVRLittleEndian


def inflated_size(path: Path, cap: int) -> int:
    """Bytes of the deflated data set of ``path`` once inflated, measured as a stream;
    stops counting past ``cap`` (returns a value above it)."""
    with path.open("rb") as stored:
        read_file_meta(stored)
        try:
            return inflate(stored, None, cap)
        except DatasetTooLargeError:
            return cap + 1
        except UnreadableDatasetError:
            return 0  # pydicom reads what there is, no more than the file holds


def whole_read_bytes(path: Path, cap: int) -> int:
    """Bytes a read of the whole data set of ``path`` holds: the file's size, or for a
    deflated one twice its inflated size (the inflated bytes and the values parsed from
    them); above ``cap`` means: more than ``cap``."""
    return 2 * inflated_size(path, cap) if is_deflated(path) else path.stat().st_size


def reserve_conversion(budget: ResourceBudget, path: Path, what: str) -> "Reservation":
    """Reserve what converting the whole object of ``path`` holds (transcoding,
    de-identification): its bytes and the data set parsed from them (twice a whole read),
    its frames decoded and re-encoded (four times the decoded pixels). Blocking: call it in
    the decode pool; release the reservation when the result is sent."""
    held = budget.reserve_header_read(path)
    try:
        # Large values (a huge private OB) are left unread: only the image attributes count.
        ds = dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
        pixels = frame_bytes(ds) * int(ds.get("NumberOfFrames") or 1) if "Rows" in ds else 0
        held.what = what
        held.resize(2 * budget.whole_read_bytes(path) + 4 * pixels)
    except BaseException:
        held.release()
        raise
    return held


def check_output_pixels(source: tuple[int, int], output: tuple[int, int], limit: int) -> None:
    """OverBudget 400 when ``output`` (width, height) upscales ``source`` past ``limit``
    pixels. The viewport is where the client shows the image (PS3.18 8.3.5.1.3); it may
    be filled at the client's side as well, so a larger image is never made here."""
    pixels = output[0] * output[1]
    if pixels > limit and pixels > source[0] * source[1]:
        raise refuse(400, "output_pixels",
                     f"the requested size {output[0]}x{output[1]} scales the "
                     f"{source[0]}x{source[1]} image up past {limit} pixels "
                     "(max_output_pixels): ask for a smaller viewport")


def check_frame_list(numbers: list[int], count: int) -> None:
    """OverBudget 400 when a frame list names a frame twice or more frames than the
    instance has (NumberOfFrames): each part is sent once."""
    if len(numbers) > count:
        raise refuse(400, "frames", f"{len(numbers)} frames asked of an instance that has "
                     f"{count}")
    seen: set[int] = set()
    for number in numbers:
        if number in seen:
            raise refuse(400, "frames", f"frame {number} is asked more than once")
        seen.add(number)
