"""Operator endpoints: queue the publication, withdrawal or confidentiality change of a
study (``POST /admin/studies/{study}/{action}``). Each goes through the outbox like the
automatic publications, and the answer is the queued row (202)."""

import json
from dataclasses import asdict

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.publication.mhd import Confidentiality
from gateway.web.http.errors import ADMIN_PATH, error_response
from gateway.web.services import services_of
from storage.outbox import Action, Outbox

_ACTIONS = {"publish": Action.PUBLISH, "unpublish": Action.UNPUBLISH,
            "confidentiality": Action.CONFIDENTIALITY}


_MAX_BODY_BYTES = 64 << 10  # a confidentiality change is a few dozen bytes


class BodyTooLargeError(ValueError):
    """A request body over the limit of this endpoint (HTTP 413)."""


def _error(status: int, message: str) -> Response:
    return error_response(ADMIN_PATH, status, message)


async def _small_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY_BYTES:
            raise BodyTooLargeError(f"request body over {_MAX_BODY_BYTES} bytes")
    return bytes(body)


async def queue_study_action(request: Request) -> JSONResponse:
    """Queue one action; the confidentiality body is ``{"level": "R", "masking": [...]}``."""
    action = _ACTIONS.get(request.path_params["action"])
    if action is None:
        return _error(404, f"unknown action {request.path_params['action']!r}: "
                           f"{', '.join(_ACTIONS)}")
    payload = ""
    if action is Action.CONFIDENTIALITY:
        try:
            body = json.loads(await _small_body(request) or b"{}")
            payload = Confidentiality(str(body.get("level", "N")),
                                      tuple(body.get("masking", []))).payload()
        except BodyTooLargeError as exc:
            return _error(413, str(exc))
        except RecursionError:
            return _error(400, "JSON nested too deeply")
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, f"expected {{\"level\": \"N|R|V\", \"masking\": [codes]}}: {exc}")
    outbox: Outbox = services_of(request).outbox
    try:
        row = await run_in_threadpool(outbox.queue, request.path_params["study"], action,
                                      payload)
    except LookupError as exc:
        return _error(404, str(exc))
    services_of(request).wake_publisher()
    return JSONResponse(asdict(row), status_code=202)
