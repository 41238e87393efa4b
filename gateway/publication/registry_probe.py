"""Whether the registry answers now: a bounded ``GET [base]/metadata`` (its FHIR
CapabilityStatement) with the publisher's HTTP client settings (CA, client certificate),
for the health page. Its result is kept ``every`` seconds per process, so a page that
refreshes itself never floods the registry: callers during a probe wait for its result.
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
        self._lock = threading.Lock()
        self._last: Reachability | None = None
        self._last_at = 0.0  # monotonic time of the last probe

    def check(self) -> Reachability:
        """The last result, probing again (blocking, up to a few seconds) when it is older
        than ``every``; call it off the event loop."""
        with self._lock:
            if self._last is None or time.monotonic() - self._last_at >= self.every:
                self._last = self._probe()
                self._last_at = time.monotonic()
            return self._last

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
