"""At most N HTTP requests in progress per client address (429 beyond), so that one client
cannot take every worker from the others. A streamed response counts until its last byte."""

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.metrics import HTTP_REFUSED_OVER_LIMIT
from gateway.security.client_counts import ClientCounts
from gateway.web.http.errors import error_response

log = logging.getLogger(__name__)

_UNLIMITED_PATHS = ("/health", "/metrics")  # probes must get through a busy client


class ClientLimitMiddleware:
    """429 Too Many Requests (RFC 6585) with ``Retry-After`` past ``limit`` per address."""

    def __init__(self, app: ASGIApp, counts: ClientCounts) -> None:
        self.app = app
        self._in_progress = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        host = (scope.get("client") or ("unknown",))[0]
        if not self._in_progress.admit(host):
            HTTP_REFUSED_OVER_LIMIT.inc()
            log.warning("refused %s %s from %s: %d requests already in progress",
                        scope["method"], scope["path"], host, self._in_progress.limit)
            response = error_response(
                scope["path"], 429, "too many requests in progress from this client "
                f"(limit {self._in_progress.limit})", headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_progress.release(host)
