"""A background thread doing one pass of work every ``interval`` seconds until stopped."""

import logging
import threading

log = logging.getLogger(__name__)


class PeriodicWorker:
    """Subclasses implement ``work``; ``wake`` starts the next pass at once."""

    def __init__(self, name: str, interval: float) -> None:
        self.interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def work(self) -> None:
        """One pass."""
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called: a long pass should end early."""
        return self._stopping.is_set()

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def wake(self) -> None:
        """Do the next pass now."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the pass in progress and wait for the thread."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.work()
            except Exception:  # a locked or failing index must not kill the thread
                log.exception("%s: pass failed; retrying", self._thread.name)
            self._wake.wait(self.interval)
            self._wake.clear()
