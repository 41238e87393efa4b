"""Parses each request's ``RequestTarget`` once, for everything after it (authentication,
manifest scope, handlers, and the audit around them), and refuses what no route can serve
as asked: a method the route does not serve (405 with ``Allow``, RFC 9110 15.5.6), a
single-valued parameter repeated (400)."""

import logging
from collections.abc import Sequence

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.metrics import HTTP_REQUESTS_REFUSED
from gateway.web.http.errors import error_response
from gateway.web.http.request_target import parse_target, store_target

log = logging.getLogger(__name__)


class RequestTargetMiddleware:
    """Puts the parsed target in the scope; answers 405 / 400 for a request that cannot be
    served as asked, before it reaches anything else."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = parse_target(scope, self.routes)
        store_target(scope, target)
        if target.method_allowed and not target.problem:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        if not target.method_allowed:
            HTTP_REQUESTS_REFUSED.labels("method").inc()
            allowed = ", ".join(sorted(target.methods))
            log.warning("refused %s %s from %s: the resource serves %s", target.method,
                        scope["path"], client, allowed)
            response = error_response(scope["path"], 405, f"{target.method} is not served "
                                      f"here; this resource serves {allowed}",
                                      headers={"Allow": allowed})
        else:
            HTTP_REQUESTS_REFUSED.labels("repeated_parameter").inc()
            log.warning("refused %s %s from %s: %s", target.method, scope["path"], client,
                        target.problem)
            response = error_response(scope["path"], 400, target.problem)
        await response(scope, receive, send)
