"""What each client address has open (connections, associations, requests in progress)
under a limit per address: the bookkeeping of the DICOM server (one thread per
association) and of the HTTP side (one event loop)."""

import threading
from collections import Counter


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
