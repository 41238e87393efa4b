"""ASGI middleware, outermost first in ``gateway.web.app``: per-client limit, access audit,
CORS, request target (parsed once for all that follows), authentication, manifest scope."""
