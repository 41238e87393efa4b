"""Error bodies, one format per API family: JSON ``{"error": "<message>"}`` for the admin
API (``/admin``), a line of plain text for everything else (DICOMweb, WADO-URI, health,
metrics: what a DICOMweb client shows its user as is). Handlers and middleware answer an
error through ``error_response`` so that a refusal looks the same whoever makes it."""

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

ADMIN_PATH = "/admin"


def text_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error of the DICOMweb family (and of everything but the admin API)."""
    return PlainTextResponse(message + "\n", status_code=status, headers=headers)


def admin_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error of the admin API."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def error_response(path: str, status: int, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    """The error ``message`` with ``status``, in the format of the family of ``path``: for
    code that answers whatever the route (middleware, exception handlers)."""
    if path == ADMIN_PATH or path.startswith(ADMIN_PATH + "/"):
        return admin_error(status, message, headers)
    return text_error(status, message, headers)


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (unknown route 404, method 405) in the family's format."""
    assert isinstance(exc, HTTPException)
    return error_response(request.url.path, exc.status_code, exc.detail,
                          dict(exc.headers) if exc.headers else None)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug: a 500 with no detail for the client (the traceback goes to the log)."""
    return error_response(request.url.path, 500, "internal error; the service log has details")
