"""Which processes of ``passerelle serve`` serve right now, as every process sees it.

The supervisor makes one board in shared memory before it starts its children: one slot per
child (each DICOM receiver, the background worker, each HTTP worker), in which the child
writes its pid and, at least every second while its role serves, the time (``CLOCK_MONOTONIC``, one
clock for the whole machine). The supervisor clears a slot as soon as its process is gone,
so a crashed process stops counting at once, and a wedged one once its last beat is older
than ``STALE_SECONDS``. HTTP workers read the board for ``/health`` and ``/metrics``.
"""

import ctypes
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DICOM, BACKGROUND, HTTP = "dicom", "background", "http"
ROLES = (DICOM, BACKGROUND, HTTP)
BEAT_SECONDS = 1.0
STALE_SECONDS = 10.0


class _Slot(ctypes.Structure):
    # served: the process has beaten at least once (it stays set when it stops serving)
    _fields_ = [("pid", ctypes.c_int64), ("beat", ctypes.c_double), ("served", ctypes.c_bool)]


@dataclass(frozen=True)
class Board:
    """The slots, one per process, whose ``roles`` say what each one does."""

    roles: tuple[str, ...]  # of each slot, one of ROLES
    slots: Any  # multiprocessing RawArray of _Slot, written without a lock (see beat)
    restarts: Any  # RawArray of c_int64, one per role of ROLES

    @classmethod
    def create(cls, roles: Sequence[str]) -> "Board":
        """A board of one slot per process, of the ``roles`` given."""
        return cls(tuple(roles), multiprocessing.RawArray(_Slot, len(roles)),
                   multiprocessing.RawArray(ctypes.c_int64, len(ROLES)))

    @property
    def size(self) -> int:
        """How many slots (children) there are."""
        return len(self.slots)

    def role_of(self, slot: int) -> str:
        """The role of the process in ``slot``."""
        return self.roles[slot]

    def slots_of(self, role: str) -> list[int]:
        """The slots of the processes of ``role``."""
        return [slot for slot, its in enumerate(self.roles) if its == role]

    def serves(self, slot: int) -> bool:
        """True while the process of ``slot`` serves (it beat within STALE_SECONDS)."""
        beat = self.slots[slot].beat
        return bool(self.slots[slot].pid) and beat > 0 and \
            time.monotonic() - beat < STALE_SECONDS

    def beat(self, slot: int) -> None:
        """Say that the calling process serves, now. Only that process writes its slot (a
        torn read shows it dead for one look, never alive when it is not)."""
        self.slots[slot].pid = os.getpid()
        self.slots[slot].beat = time.monotonic()
        self.slots[slot].served = True

    def has_beaten(self, slot: int, pid: int) -> bool:
        """True when process ``pid`` has beaten in ``slot`` since it was last cleared."""
        return self.slots[slot].pid == pid and self.slots[slot].served

    def retire(self, slot: int) -> None:
        """Say that the calling process, in ``slot``, no longer serves (it is stopping)."""
        self.slots[slot].beat = 0.0

    def clear(self, slot: int) -> None:
        """Forget the process of ``slot`` (it is gone)."""
        self.slots[slot].pid = 0
        self.slots[slot].beat = 0.0
        self.slots[slot].served = False

    def count_restart(self, role: str) -> None:
        """One more restart of a process of ``role``."""
        self.restarts[ROLES.index(role)] += 1

    def restart_counts(self) -> dict[str, int]:
        """Restarts so far, by role."""
        return {role: int(self.restarts[n]) for n, role in enumerate(ROLES)}

    def serving(self) -> dict[str, list[int]]:
        """The pids of the processes that serve now, by role (an empty list: none)."""
        now = time.monotonic()
        pids: dict[str, list[int]] = {role: [] for role in ROLES}
        for slot in range(self.size):
            pid, beat = self.slots[slot].pid, self.slots[slot].beat  # read once: see beat
            if pid and beat > 0 and now - beat < STALE_SECONDS:
                pids[self.role_of(slot)].append(int(pid))
        return pids


def unavailable(serving: dict[str, list[int]]) -> list[str]:
    """The roles of ``serving`` without any process serving."""
    return [role for role in ROLES if not serving.get(role)]
