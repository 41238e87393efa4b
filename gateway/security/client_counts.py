"""What each client address has open (connections, associations, requests in progress)
under a limit per address: the bookkeeping of the DICOM receivers (one thread per
association) and of the HTTP side (one event loop per worker); under ``passerelle serve``
SharedClientCounts sums the counts of the processes of each."""

import contextlib
import ctypes
import hashlib
import multiprocessing
import secrets
import threading
from collections import Counter

from gateway.shared_tally import FileLock


class ClientCounts:
    """``admit`` counts one more for an address unless it already has ``limit``;
    ``release`` counts one less."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def admit(self, address: str) -> bool:
        """Count one more for ``address``; False (nothing counted) when at the limit."""
        with self._lock:
            if self._open[address] >= self.limit:
                return False
            self._open[address] += 1
            return True

    def release(self, address: str) -> None:
        """One of ``address``'s is closed or finished."""
        with self._lock:
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]


class ClientTable:
    """Counts per client address of several processes (the HTTP workers, or the DICOM
    receivers), in memory shared by the processes of
    the service (created by the supervisor before it forks them): one row per process, each
    written by its own process only, a client's count being the sum of its column.

    An address is counted in one of BUCKETS columns, chosen by a hash keyed with a secret of
    this run: two addresses may share a column (and so a limit) by chance, never by a
    client's choice of address."""

    BUCKETS = 65536

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._cells = multiprocessing.RawArray(ctypes.c_int32, rows * self.BUCKETS)
        self._key = secrets.token_bytes(16)

    def bucket(self, address: str) -> int:
        """The column of ``address``."""
        digest = hashlib.blake2b(address.encode(), key=self._key, digest_size=4).digest()
        return int.from_bytes(digest) % self.BUCKETS

    def total(self, bucket: int) -> int:
        """The count of a column over every process."""
        return sum(self._cells[row * self.BUCKETS + bucket] for row in range(self.rows))

    def add(self, row: int, bucket: int, delta: int) -> None:
        """Add ``delta`` to the count of process ``row`` in a column."""
        self._cells[row * self.BUCKETS + bucket] += delta

    def clear(self, row: int) -> None:
        """Forget the counts of process ``row`` (it died: its connections are gone)."""
        ctypes.memset(ctypes.addressof(self._cells) + row * self.BUCKETS * 4, 0,
                      self.BUCKETS * 4)


class SharedClientCounts(ClientCounts):
    """ClientCounts whose limit holds over several processes: this process counts in its
    own ``row`` of ``table`` and admits while the sum over the rows is under the limit.
    Without a ``lock`` across processes (the HTTP workers, whose event loops must not wait
    on one) two processes admitting one address at the same instant may both pass: the
    limit is exceeded by fewer than the number of processes, never more. With one (the DICOM
    receivers, a thread per association) the limit is exact."""

    def __init__(self, limit: int, table: ClientTable, row: int,
                 lock: FileLock | None = None) -> None:
        super().__init__(limit)
        self._table, self._row = table, row
        self._across = lock

    def admit(self, address: str) -> bool:
        """Count one more for ``address`` in this process; False when every process
        together has ``limit``."""
        bucket = self._table.bucket(address)
        with self._lock, self._across.held() if self._across else contextlib.nullcontext():
            if self._table.total(bucket) >= self.limit:
                return False
            self._table.add(self._row, bucket, 1)
            return True

    def release(self, address: str) -> None:
        """One of ``address``'s is closed or finished."""
        with self._lock:
            self._table.add(self._row, self._table.bucket(address), -1)
