"""In the loopback demo mode (no authentication), only requests addressed to this machine
by one of its own names are served: a page of another site that points its own name at
127.0.0.1 (DNS rebinding) would otherwise be served the patients' data as same-origin, and
could read the console's form token. Elsewhere a token or a certificate is needed anyway."""

import logging
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_LOG_SECONDS = 10  # at most one log line per period: a flood must not flood the log


def host_name(host_header: str) -> str:
    """The name of a ``Host`` header, without its port; IPv6 without brackets."""
    try:
        return (urlsplit(f"//{host_header}").hostname or "").lower()
    except ValueError:  # e.g. an unclosed bracket
        return ""


class AllowedHostsMiddleware:
    """Answers 400 to a request whose ``Host`` is none of ``names``."""

    def __init__(self, app: ASGIApp, names: Iterable[str]) -> None:
        self.app = app
        self.names = frozenset(name.lower() for name in names if name)
        self._logged = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            name = host_name(headers.get(b"host", b"").decode("latin-1"))
            if name not in self.names:
                if time.monotonic() - self._logged >= _LOG_SECONDS:
                    self._logged = time.monotonic()
                    log.warning("refused a request for the host name %r from %s", name[:100],
                                (scope.get("client") or ("?",))[0])
                response = JSONResponse(
                    {"error": f"not served under the name {name[:100]!r}: without "
                              "authentication only this machine's names and public_url's "
                              "host are"}, status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
