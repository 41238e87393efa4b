"""Operator API under ``/admin``: the stored studies and the outbox (``GET``), and the
actions that go through the outbox like the automatic publications (``POST``): publish,
withdraw or change the confidentiality of a study, send a failed publication again.

A queued action answers 202 with what the service will do with it:
``{"publication": <row>, "registry": <registry URL or null>, "will_send": true|false}``.
The same ``ROUTES`` serve the HTTP listener (behind its authentication) and the control
channel of the data dir (``gateway.control``).
"""

import json
from dataclasses import asdict

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.publication.confidentiality import Confidentiality
from gateway.web.http.errors import admin_error
from gateway.web.services import Services, services_of
from storage.numbers import INT64_MAX, NumberError, parse_int
from storage.outbox import UNFINISHED, Action, NotFailedError, Publication, State

_ACTIONS = {"publish": Action.PUBLISH, "unpublish": Action.UNPUBLISH,
            "confidentiality": Action.CONFIDENTIALITY}


_MAX_BODY_BYTES = 64 << 10  # a confidentiality change is a few dozen bytes


class BodyTooLargeError(ValueError):
    """A request body over the limit of this endpoint (HTTP 413)."""


async def _small_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY_BYTES:
            raise BodyTooLargeError(f"request body over {_MAX_BODY_BYTES} bytes")
    return bytes(body)


def _queued(services: Services, row: Publication) -> JSONResponse:
    """202 with the row and whether this service sends it, and where."""
    services.wake_publisher()
    return JSONResponse({"publication": asdict(row), "registry": services.registry_url or None,
                         "will_send": bool(services.registry_url)}, status_code=202)


async def queue_study_action(request: Request) -> Response:
    """Queue one action; the confidentiality body is ``{"level": "R", "masking": [...]}``."""
    action = _ACTIONS.get(request.path_params["action"])
    if action is None:
        return admin_error(404, f"unknown action {request.path_params['action']!r}: "
                           f"{', '.join(_ACTIONS)}")
    payload = ""
    if action is Action.CONFIDENTIALITY:
        try:
            body = json.loads(await _small_body(request) or b"{}")
            payload = Confidentiality(str(body.get("level", "N")),
                                      tuple(body.get("masking", []))).payload()
        except BodyTooLargeError as exc:
            return admin_error(413, str(exc))
        except RecursionError:
            return admin_error(400, "JSON nested too deeply")
        except (ValueError, TypeError, AttributeError) as exc:
            return admin_error(
                400, f"expected {{\"level\": \"N|R|V\", \"masking\": [codes]}}: {exc}")
    services = services_of(request)
    try:
        row = await run_in_threadpool(services.outbox.queue, request.path_params["study"],
                                      action, payload)
    except LookupError as exc:
        return admin_error(404, str(exc))
    return _queued(services, row)


async def retry_publication(request: Request) -> Response:
    """Put a failed publication back in the queue (409 when it is not failed)."""
    services = services_of(request)
    try:
        pk = parse_int(request.path_params["id"], "publication id", 1, INT64_MAX)
    except NumberError as exc:
        return admin_error(400, str(exc))
    try:
        retried = await run_in_threadpool(services.outbox.retry, pk)
    except NotFailedError as exc:
        return admin_error(409, str(exc))
    except LookupError as exc:
        return admin_error(404, str(exc))
    return _queued(services, retried)


async def list_outbox(request: Request) -> JSONResponse:
    """The unfinished publications, oldest first; ``?all=true``: the acknowledged too."""
    everything = request.query_params.get("all", "").lower() in ("1", "true", "yes")
    rows = await run_in_threadpool(services_of(request).outbox.listing,
                                   tuple(State) if everything else UNFINISHED)
    return JSONResponse([asdict(row) for row in rows])


async def list_studies(request: Request) -> JSONResponse:
    """Every stored study with its counts."""
    studies = await run_in_threadpool(services_of(request).store.index.list_studies)
    return JSONResponse([asdict(study) for study in studies])


async def study(request: Request) -> Response:
    """One study's summary and its publications."""
    services, uid = services_of(request), request.path_params["study"]
    found = await run_in_threadpool(services.store.index.list_studies, uid)
    if not found:
        return admin_error(404, f"no such study {uid}")
    rows = await run_in_threadpool(services.outbox.listing, tuple(State), uid)
    return JSONResponse({"study": asdict(found[0]), "publications": [asdict(r) for r in rows]})


ROUTES = [
    Route("/admin/studies", list_studies, methods=["GET"]),
    Route("/admin/studies/{study}", study, methods=["GET"]),
    Route("/admin/studies/{study}/{action}", queue_study_action, methods=["POST"]),
    Route("/admin/outbox", list_outbox, methods=["GET"]),
    Route("/admin/outbox/{id}/retry", retry_publication, methods=["POST"]),
]
