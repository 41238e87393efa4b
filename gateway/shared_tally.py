"""Bytes held by several processes against one capacity (the resource budget of
``passerelle serve``'s processes, gateway.imaging.budget).

The tally is a file of one 8-byte count per process slot, each slot written only by the
process that holds it (and zeroed by the supervisor once that process is gone, so the bytes
of a crashed process come back). A change is read and written under ``flock``: the kernel
drops the lock of a process that dies, so no crash can leave the others waiting forever.
"""

import fcntl
import os
import struct
import threading
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


class SharedTally:
    """This process's view of a tally: it sets its own slot, reads everyone's."""

    def __init__(self, path: Path, slot: int) -> None:
        self.path = path
        self.slot = slot
        self._fd = os.open(path, os.O_RDWR)
        # flock does not exclude the threads of one process (they share the descriptor).
        self._threads = threading.Lock()

    def _counts(self) -> list[int]:
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        return [count for (count,) in _COUNT.iter_unpack(data)]

    def try_hold(self, held: int, capacity: int) -> bool:
        """Set this process's count to ``held`` if every process together then holds at
        most ``capacity``; False (nothing changed) otherwise. Lowering always succeeds."""
        with self._threads:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                counts = self._counts()
                others = sum(counts) - counts[self.slot]
                if held > counts[self.slot] and others + held > capacity:
                    return False
                os.pwrite(self._fd, _COUNT.pack(held), self.slot * _COUNT.size)
                return True
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def total(self) -> int:
        """What every process holds together right now."""
        with self._threads:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            try:
                return sum(self._counts())
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
