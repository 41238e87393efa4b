"""A running service watched while a ``with`` block attacks it: its peak RSS (psutil,
sampled every 20 ms in a thread) and, for ``Watch``, the latency of its ``/health``."""

import threading
import time

import httpx

from tests.processes import PasserelleProcess

MIB = 1 << 20


class PeakRss:
    """The service's RSS (its supervisor and every process under it, added up) sampled
    every 20 ms in a thread, from its value at entry."""

    def __init__(self, server: PasserelleProcess) -> None:
        self.server = server
        self.start = self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.server.rss())
            self._done.wait(0.02)

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = self.server.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        """Peak RSS above the RSS at entry."""
        return self.peak - self.start


class Watch:
    """Peak RSS of the service and ``/health`` latency while the ``with`` block runs."""

    def __init__(self, server: PasserelleProcess, what: str) -> None:
        self.server = server
        self.what = what
        self.rss = PeakRss(server)
        self.latencies: list[float] = []
        self.health_failures: list[str] = []
        self._done = threading.Event()
        self._probed = threading.Event()  # one probe answered (or failed) since the start
        self._thread = threading.Thread(target=self._probe)

    def _probe(self) -> None:
        with httpx.Client(base_url=self.server.base_url, timeout=30) as client:
            while not self._done.is_set():
                start = time.monotonic()
                try:
                    status = client.get("/health").status_code
                    if status != 200:
                        self.health_failures.append(str(status))
                except httpx.HTTPError as exc:
                    self.health_failures.append(repr(exc))
                self.latencies.append(time.monotonic() - start)
                self._probed.set()
                self._done.wait(0.05)

    def __enter__(self) -> "Watch":
        self.rss.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._probed.wait(60)  # a short attack: /health answers right after it
        self._done.set()
        self._thread.join()
        self.rss.__exit__(*exc_info)
        latencies = sorted(self.latencies) or [0.0]
        print(f"\n{self.what}: RSS {self.rss.start / MIB:.0f} MiB before, peak "
              f"{self.rss.peak / MIB:.0f} MiB (+{self.growth / MIB:.0f} MiB); /health "
              f"{len(self.latencies)} probes, median {latencies[len(latencies) // 2]:.3f} s,"
              f" max {latencies[-1]:.3f} s")

    @property
    def growth(self) -> int:
        """Peak RSS above the RSS before the attack."""
        return self.rss.growth

    def check(self, bound: int) -> None:
        """The RSS stayed within ``bound`` above its start, and /health answered."""
        assert self.latencies, "no /health probe completed"
        assert not self.health_failures, self.health_failures
        assert self.growth < bound, f"RSS grew by {self.growth / MIB:.0f} MiB"
