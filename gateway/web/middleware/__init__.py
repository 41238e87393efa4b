"""ASGI middleware, outermost first in ``gateway.web.app``: per-client limit, access audit,
CORS, authentication, manifest scope."""
