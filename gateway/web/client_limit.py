"""At most N HTTP requests in progress per client address (429 beyond), so that one client
cannot take every worker from the others. A streamed response counts until its last byte."""

import logging
from collections import Counter

from prometheus_client import Counter as MetricCounter
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

REFUSED = MetricCounter("passerelle_http_refused_over_limit_total",
                        "HTTP requests refused because their client had too many in progress")
_UNLIMITED_PATHS = ("/health", "/metrics")  # probes must get through a busy client


class ClientLimitMiddleware:
    """429 Too Many Requests (RFC 6585) with ``Retry-After`` past ``limit`` per address."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._in_progress: Counter[str] = Counter()  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        host = (scope.get("client") or ("unknown",))[0]
        if self._in_progress[host] >= self.limit:
            REFUSED.inc()
            log.warning("refused %s %s from %s: %d requests already in progress",
                        scope["method"], scope["path"], host, self.limit)
            response = PlainTextResponse(
                f"too many requests in progress from this client (limit {self.limit})",
                status_code=429, headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        self._in_progress[host] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_progress[host] -= 1
            if not self._in_progress[host]:
                del self._in_progress[host]
