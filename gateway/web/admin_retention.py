"""The retention actions of the admin API (gateway.pacs.retention), part of ``admin.ROUTES``:

- ``POST /admin/studies/{study}/purge``: remove one study's local copy under retention's
  guarantee: 200 ``{"decision": ...}`` (``action`` ``removed``, or ``gone`` when it was
  removed before), 409 ``{"error": <why it is kept>, "decision": ...}``, 404 when the study
  is not stored;
- ``POST /admin/retention`` (``?dry_run=true``: only say): one pass of the policy, 200
  ``{"dry_run": ..., "decisions": [...]}``, every study with files here, what went (or would
  go) and what stays, with why.
"""

from dataclasses import asdict

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.pacs.retention import Retention
from gateway.web.http.errors import admin_error
from gateway.web.http.origin import foreign_origin
from gateway.web.http.request_target import target_of
from gateway.web.services import services_of

# Who asked, over the control socket (no authentication there: gateway.control).
LOCAL_OPERATOR = "local operator"


def _retention(request: Request) -> Retention | Response:
    """The service's retention, or the response refusing the request (403 for an action
    a page of another site made the browser send)."""
    services = services_of(request)
    if foreign := foreign_origin(request, services.public_url):
        return admin_error(403, f"refused: {foreign}")
    if services.retention is None:
        return admin_error(503, "retention is not available in this process")
    return services.retention


def _who(request: Request) -> tuple[object, str]:
    return (request.scope.get("user") or LOCAL_OPERATOR,
            (request.scope.get("client") or ("", 0))[0])


async def purge_study(request: Request) -> Response:
    """Remove one study's local copy, or say why it stays (409)."""
    retention = _retention(request)
    if isinstance(retention, Response):
        return retention
    study_uid = request.path_params["study"]
    user, address = _who(request)
    try:
        decision = await run_in_threadpool(retention.purge, study_uid, user, address)
    except LookupError as exc:
        return admin_error(404, str(exc))
    if decision.action == "keep":
        return JSONResponse({"error": f"local copy of study {study_uid} kept:"
                                      f" {decision.reason}", "decision": asdict(decision)},
                            status_code=409)
    return JSONResponse({"decision": asdict(decision)})


async def run_retention(request: Request) -> Response:
    """One pass of the policy (a dry run with ``dry_run=true``)."""
    retention = _retention(request)
    if isinstance(retention, Response):
        return retention
    dry_run = target_of(request).param("dry_run").lower() in ("1", "true", "yes")
    user, address = _who(request)
    decisions = await run_in_threadpool(retention.run, dry_run, user, address)
    return JSONResponse({"dry_run": dry_run, "decisions": [asdict(d) for d in decisions]})


# Before admin's /admin/studies/{study}/{action}, which would take the purge for an action.
ROUTES = [
    Route("/admin/studies/{study}/purge", purge_study, methods=["POST"]),
    Route("/admin/retention", run_retention, methods=["POST"]),
]
