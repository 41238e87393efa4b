"""The connections and associations a DICOM receiver holds, counted against the limits of
the service: of this process alone (an SCP in a test, ``passerelle`` commands), or of
every DICOM receiver process of ``passerelle serve`` together (``shared``), each counting
in its own slot of a tally the supervisor made (gateway.shared_tally) and zeroes when the
process is gone.

Several receivers accept on one listening socket; the kernel hands a connection to
whichever asks first, and two that arrive together can land in one process while another
is idle. So a receiver lets a waiting connection go to a less busy live peer
(``should_defer``), at most ``DEFER_SECONDS``: the load is spread over the processes, and
their interpreters, instead of left to chance.
"""

import threading
import time
from collections.abc import Callable, Sequence

from gateway.shared_tally import SharedTally

DEFER_SECONDS = 0.02  # at most this long a connection waits for a less busy peer
# A look this long after the last one is about another connection: the one waited for was
# taken by a peer (the accept loop looks every few milliseconds while one waits).
_NEW_WAIT_SECONDS = DEFER_SECONDS / 2


class Count:
    """How many this process holds, against ``capacity`` over every process of ``tally``
    (this process alone without one)."""

    def __init__(self, capacity: int, tally: SharedTally | None = None) -> None:
        self.capacity = capacity
        self.held = 0
        self._tally = tally
        self._lock = threading.Lock()

    def take(self) -> bool:
        """One more, unless every process together holds ``capacity``."""
        with self._lock:
            if self._tally is None:
                taken = self.held < self.capacity
            else:
                taken = self._tally.try_hold(self.held + 1, self.capacity)
            self.held += taken
            return taken

    def give(self, count: int = 1) -> None:
        """``count`` fewer."""
        if count:
            with self._lock:
                self.held -= count
                if self._tally is not None:
                    self._tally.try_hold(self.held, self.capacity)  # lowering: always

    def total(self) -> int:
        """What every process holds together."""
        return self.held if self._tally is None else self._tally.total()

    def by_slot(self) -> list[int]:
        """What each process slot holds (empty without a tally)."""
        return [] if self._tally is None else self._tally.counts()


class AssociationSlots:
    """Connections still negotiating (``pending``, at most ``max_pending``) and
    associations served (``served``, at most ``max_associations``); ``peers()``, when
    shared, gives the slots of the other receivers that serve now."""

    def __init__(self, max_pending: int, max_associations: int,
                 pending: SharedTally | None = None, served: SharedTally | None = None,
                 peers: Callable[[], Sequence[int]] | None = None) -> None:
        self.pending = Count(max_pending, pending)
        self.served = Count(max_associations, served)
        self._peers = peers
        self._deferring_since: float | None = None
        self._last_look = 0.0

    def should_defer(self) -> bool:
        """True when a live peer holds fewer connections than this process and the waiting
        connection has not waited ``DEFER_SECONDS`` yet: leave it to that peer. Called by
        the accept thread only."""
        if self._peers is None:
            return False
        peers = self._peers()
        pending, served = self.pending.by_slot(), self.served.by_slot()
        mine = self.pending.held + self.served.held
        if not any(pending[slot] + served[slot] < mine for slot in peers):
            self._deferring_since = None
            return False
        now = time.monotonic()
        if self._deferring_since is None or now - self._last_look > _NEW_WAIT_SECONDS:
            self._deferring_since = now
        self._last_look = now
        if now - self._deferring_since >= DEFER_SECONDS:
            self._deferring_since = None
            return False
        return True

    def stop_waiting(self) -> None:
        """The waiting connection is taken, here or by a peer: the next one waits afresh."""
        self._deferring_since = None
