"""One audit event per DICOMweb / WADO-URI request and per admin listing (a Query: it shows
patients), with its outcome, and one per refused credential: the ASGI middleware around
everything else (so it sees the 401s and 403s)."""

import re
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.security.audit import AuditEvent, AuditTrail, EventType, Outcome
from gateway.web.middleware.manifest_scope import kos_reference

_STUDY = re.compile(r"/(?:dicom-web|admin)/studies/([^/]+)")
_QUERY = re.compile(r"/dicom-web/(?:studies(?:/[^/]+(?:/series(?:/[^/]+)?)?)?/)?"
                    r"(?:studies|series|instances)")
_ACCESS = ("/rendered", "/thumbnail", "/metadata", "/frames/", "/bulkdata/")


def _event(method: str, path: str) -> tuple[EventType, str] | None:
    """(event type, action) of a request, None when it is not audited."""
    if path == "/wado":
        return EventType.INSTANCES_TRANSFERRED, "R"
    if path.startswith("/admin/"):
        # Queueing is audited by the publisher (Export); a listing is a query of the index.
        return (EventType.QUERY, "E") if method == "GET" else None
    if not path.startswith("/dicom-web"):
        return None
    if method == "POST":
        return EventType.INSTANCES_TRANSFERRED, "C"
    if _QUERY.fullmatch(path):
        return EventType.QUERY, "E"
    if any(part in path for part in _ACCESS):
        return EventType.INSTANCES_ACCESSED, "R"
    return EventType.INSTANCES_TRANSFERRED, "R"


def _study(path: str, query: str) -> str:
    match = _STUDY.match(path)
    if match:
        return match.group(1)
    return parse_qs(query).get("studyUID", [""])[0] if path == "/wado" else ""


def _outcome(status: int) -> Outcome:
    if status >= 500:
        return Outcome.SERIOUS_FAILURE
    return Outcome.MINOR_FAILURE if status >= 400 else Outcome.SUCCESS


class AccessAuditMiddleware:
    """Audits each request once its response has started (or failed)."""

    def __init__(self, app: ASGIApp, trail: AuditTrail) -> None:
        self.app = app
        self.trail = trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self._record(scope, status)

    def _record(self, scope: Scope, status: int) -> None:
        path, method = scope["path"], scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        address = (scope.get("client") or ("", 0))[0]
        user = scope.get("user") or "anonymous"
        if status == 401:
            self.trail.record(AuditEvent(EventType.USER_AUTHENTICATION, "E",
                                         Outcome.MINOR_FAILURE, user, address,
                                         detail=f"{method} {path}: no valid token"))
            return
        kind = _event(method, path)
        if kind is None:
            return
        event, action = kind
        # Which manifest opened (or failed to open) the door belongs in the trail.
        kos_uid = kos_reference(scope)
        through = f" via KOS {kos_uid[:64]}" if kos_uid else ""
        self.trail.record(AuditEvent(
            event, action, _outcome(status), user, address, _study(path, query),
            detail=f"{method} {path}{through} -> {status}",
            query=query if event is EventType.QUERY else ""))
