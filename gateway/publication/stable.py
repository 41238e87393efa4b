"""Stable-study detection: a study that received nothing for ``stable_seconds`` is queued
for publication in the outbox (the queue state is in the index, so it survives restarts).
Every replica runs a watcher; the outbox queues each study once however many run at once."""

import logging

from gateway.publication.periodic import PeriodicWorker
from storage.outbox import Outbox

log = logging.getLogger(__name__)


class StableStudyWatcher(PeriodicWorker):
    """Queues quiet studies every ``interval`` seconds until stopped."""

    def __init__(self, outbox: Outbox, stable_seconds: float, interval: float = 1.0) -> None:
        super().__init__("stable-studies", min(interval, stable_seconds))
        self.outbox = outbox
        self.stable_seconds = stable_seconds

    def work(self) -> None:
        """Queue every study that became stable."""
        for study_uid in self.outbox.queue_stable_studies(self.stable_seconds):
            log.info("study %s is stable: publication queued", study_uid)
