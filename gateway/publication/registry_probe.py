"""Whether the registry answers now: a bounded ``GET [base]/metadata`` (its FHIR
CapabilityStatement) with the publisher's HTTP client settings (CA, client certificate),
for the health page. Its result is kept ``every`` seconds per process, so a page that
refreshes itself never floods the registry. One probe runs at a time, in a thread of its
own; a caller waits for it at most ``PROBE_DEADLINE`` seconds, and only when there is no
earlier result to give (others get that one at once), so a slow registry holds no request.
"""

import functools
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from gateway.publication.operation_outcome import outcome_issues
from gateway.publication.registry_client import registry_http

PROBE_TIMEOUT = 3.0  # seconds to connect, to get the answer's head, to read its reason
PROBE_DEADLINE = 5.0  # seconds a probe may take in all (a head sent a byte at a time...)
PROBE_EVERY = 30.0  # seconds a result is kept
MAX_ANSWER_BYTES = 64 << 10  # read of a failure's answer at most (a success: its head)


@dataclass(frozen=True, slots=True)
class Reachability:
    """What the probe met: an HTTP answer (``status``, in ``round_trip_ms``) or none
    (``error``: why, as text); ``problem``: what is wrong with an answer that is not 2xx
    (its OperationOutcome's issues, or its reason phrase); ``checked_at``: seconds since the
    epoch."""

    checked_at: float
    status: int | None = None
    round_trip_ms: int | None = None
    error: str = ""
    problem: str = ""

    @property
    def reachable(self) -> bool:
        """The registry answered (whatever its status)."""
        return self.status is not None

    @property
    def ok(self) -> bool:
        """The registry answered with success."""
        return self.status is not None and 200 <= self.status < 300


def _reason(exc: httpx.HTTPError | httpx.InvalidURL) -> str:
    """A failed request as a person reads it."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {PROBE_TIMEOUT:g} s ({text})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {text}"
    if isinstance(exc, httpx.InvalidURL):
        return f"invalid registry URL: {text}"
    return f"connection failed: {text}"


class RegistryProbe:
    """The registry at ``base_url`` (its FHIR base), probed at most every ``every`` s;
    ``tls`` makes the publisher's client context (None: the default checks), at the first
    probe: an unusable certificate file is then the probe's error, not its process's."""

    def __init__(self, base_url: str,
                 tls: Callable[[], ssl.SSLContext | None] = lambda: None,
                 every: float = PROBE_EVERY,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = f"{base_url.rstrip('/')}/metadata"
        self.every = every
        self._tls = functools.cache(tls)  # an exception is not kept: tried again next time
        self._transport = transport
        self._lock = threading.Lock()  # held for bookkeeping only, never during a probe
        self._last: Reachability | None = None
        self._last_at = 0.0  # monotonic time of the last result
        self._running: threading.Thread | None = None

    def check(self) -> Reachability:
        """The last result, probing again when it is older than ``every``; blocks (off the
        event loop) up to ``PROBE_DEADLINE`` only when there is no earlier result."""
        with self._lock:
            if self._last is not None and time.monotonic() - self._last_at < self.every:
                return self._last
            if self._running is None or not self._running.is_alive():
                self._running = threading.Thread(target=self._run, name="registry-probe",
                                                 daemon=True)
                self._running.start()
            elif self._last is not None:
                return self._last  # a probe is under way: its predecessor's result
            running = self._running
        running.join(PROBE_DEADLINE)
        with self._lock:
            if running.is_alive():  # it overran: said so, until it ends
                self._last = Reachability(time.time(), error="no complete answer within "
                                          f"{PROBE_DEADLINE:g} s")
                self._last_at = time.monotonic()
            assert self._last is not None
            return self._last

    def _run(self) -> None:
        result = self._probe()
        with self._lock:
            self._last, self._last_at = result, time.monotonic()

    def _probe(self) -> Reachability:
        checked_at = time.time()
        try:
            tls = self._tls()
        except OSError as exc:  # ssl.SSLError too
            return Reachability(checked_at, error=f"registry TLS settings unusable: {exc}")
        started = time.monotonic()
        try:
            # Not compressed: what is read of an answer is what it says.
            with registry_http(PROBE_TIMEOUT, tls, self._transport) as client, \
                    client.stream("GET", self.url,
                                  headers={"Accept-Encoding": "identity"}) as response:
                elapsed = round((time.monotonic() - started) * 1000)
                body = bytearray()
                if not response.is_success:  # its reason, read within the bounds
                    for chunk in response.iter_raw():
                        body += chunk
                        if len(body) >= MAX_ANSWER_BYTES or \
                                time.monotonic() - started > PROBE_TIMEOUT:
                            break  # the rest is not read: closing drops the connection
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return Reachability(checked_at, error=_reason(exc))
        problem = "" if response.is_success else "; ".join(
            issue.text for issue in outcome_issues(bytes(body))) or response.reason_phrase
        return Reachability(checked_at, response.status_code, elapsed, problem=problem)
