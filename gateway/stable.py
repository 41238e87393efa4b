"""Stable-study detection: a study that received nothing for ``stable_seconds`` is queued
for publication in the outbox (the queue state is in the index, so it survives restarts)."""

import logging
import threading

from storage.outbox import Outbox

log = logging.getLogger(__name__)


class StableStudyWatcher:
    """A thread that queues quiet studies every ``interval`` seconds until stopped."""

    def __init__(self, outbox: Outbox, stable_seconds: float, interval: float = 1.0) -> None:
        self.outbox = outbox
        self.stable_seconds = stable_seconds
        self.interval = min(interval, stable_seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stable-studies", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                for study_uid in self.outbox.queue_stable_studies(self.stable_seconds):
                    log.info("study %s is stable: publication queued", study_uid)
            except Exception:  # a locked or failing index must not kill the watcher
                log.exception("stable-study check failed; retrying")
