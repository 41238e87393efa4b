"""What several processes hold against one capacity: bytes of the resource budget of
``passerelle serve``'s processes (gateway.imaging.budget), connections and associations of
its DICOM receivers (gateway.dicom.slots).

The tally is a file of one 8-byte count per process slot, each slot written only by the
process that holds it (and zeroed by the supervisor once that process is gone, so what a
crashed process held comes back). A change is read and written under ``flock``
(FileLock): the kernel drops the lock of a process that dies, so no crash can leave the
others waiting forever.
"""

import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_COUNT = struct.Struct("<q")


def create_tally(path: Path, slots: int) -> None:
    """A tally of ``slots`` zero counts at ``path`` (replacing any left by an earlier run)."""
    path.write_bytes(bytes(_COUNT.size * slots))


def clear_slot(path: Path, slot: int) -> None:
    """Zero the count of ``slot``: its process is gone and holds nothing any more."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, _COUNT.pack(0), slot * _COUNT.size)
    finally:
        os.close(fd)  # closing releases the lock


class FileLock:
    """A lock over the threads of this process and every process that opens ``path``."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        # flock does not exclude the threads of one process (they share the descriptor).
        self._threads = threading.Lock()

    @contextmanager
    def held(self, exclusive: bool = True) -> Iterator[None]:
        """Hold the lock (shared, for reading only, when not ``exclusive``)."""
        with self._threads:
            fcntl.flock(self.fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


class SharedTally:
    """This process's view of a tally: it sets its own slot, reads everyone's."""

    def __init__(self, path: Path, slot: int) -> None:
        self.path = path
        self.slot = slot
        self._lock = FileLock(path)

    def _read(self) -> list[int]:
        data = os.pread(self._lock.fd, os.fstat(self._lock.fd).st_size, 0)
        return [count for (count,) in _COUNT.iter_unpack(data)]

    def try_hold(self, held: int, capacity: int) -> bool:
        """Set this process's count to ``held`` if every process together then holds at
        most ``capacity``; False (nothing changed) otherwise. Lowering always succeeds."""
        with self._lock.held():
            counts = self._read()
            others = sum(counts) - counts[self.slot]
            if held > counts[self.slot] and others + held > capacity:
                return False
            os.pwrite(self._lock.fd, _COUNT.pack(held), self.slot * _COUNT.size)
            return True

    def counts(self) -> list[int]:
        """What each process slot holds right now."""
        with self._lock.held(exclusive=False):
            return self._read()

    def total(self) -> int:
        """What every process holds together right now."""
        return sum(self.counts())
