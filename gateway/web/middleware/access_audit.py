"""One audit event per DICOMweb / WADO-URI request and per admin listing or console page (a
Query: it shows patients), with its outcome, and one per refused credential: the ASGI
middleware around everything else (so it sees the 401s and 403s)."""

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.security.audit import AuditEvent, AuditTrail, EventType, Outcome
from gateway.web.http.request_target import Operation, RequestTarget, find_target
from gateway.web.middleware.auth import CREDENTIALS_REFUSED

_EVENTS = {Operation.SEARCH: (EventType.QUERY, "E"),
           Operation.TRANSFER: (EventType.INSTANCES_TRANSFERRED, "R"),
           Operation.ACCESS: (EventType.INSTANCES_ACCESSED, "R"),
           Operation.STORE: (EventType.INSTANCES_TRANSFERRED, "C")}


# Requests that show no patient: the console's style sheet, script and health panel, the
# viewer's files (what it then reads of a study, through DICOMweb, is audited there); and
# the sign-in, which audits itself (User Authentication, with who signed in).
_UNAUDITED = {"/ui/static/{name}", "/ui/health", "/ui/login", "/ui/callback", "/viewer",
              "/viewer/{path:path}"}
# A study's publication history, which its page fetches again every 2 s: audited once per
# client, study and period, not at each refresh.
_REFRESHED = "/ui/studies/{study}/publications"
_REFRESH_PERIOD = 300.0
_REFRESH_MEMORY = 10_000  # (client, study) pairs remembered at most


def _event(target: RequestTarget) -> tuple[EventType, str] | None:
    """(event type, action) of a request, None when it is not audited."""
    if target.route in _UNAUDITED:
        return None
    if target.operation is Operation.ADMIN:
        # Queueing is audited by the publisher (Export); a listing is a query of the index.
        return (EventType.QUERY, "E") if target.method in ("GET", "HEAD") else None
    return _EVENTS.get(target.operation)


def _outcome(status: int) -> Outcome:
    if status >= 500:
        return Outcome.SERIOUS_FAILURE
    return Outcome.MINOR_FAILURE if status >= 400 else Outcome.SUCCESS


class AccessAuditMiddleware:
    """Audits each request once its response has started (or failed)."""

    def __init__(self, app: ASGIApp, trail: AuditTrail) -> None:
        self.app = app
        self.trail = trail
        self._refreshed: dict[tuple[str, str, str], float] = {}  # -> when last audited

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
        """One event for the request, as its ``RequestTarget`` describes it."""
        path, method = scope["path"], scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        address = (scope.get("client") or ("", 0))[0]
        user = scope.get("user") or "anonymous"
        if refused := scope.get("state", {}).get(CREDENTIALS_REFUSED):
            # The detail's last part is what the trail aggregates repeated failures by.
            self.trail.record(AuditEvent(EventType.USER_AUTHENTICATION, "E",
                                         Outcome.MINOR_FAILURE, user, address,
                                         detail=f"{method} {path}: no valid token ({refused})"))
            return
        target = find_target(scope)
        if target is None or (kind := _event(target)) is None:
            return
        if target.route == _REFRESHED and self._seen_lately(str(user), address,
                                                              target.study or ""):
            return
        # A method no route serves, a parameter repeated: refused before any credential or
        # data was read, an attempt on no study, so none (and no patient) is named.
        refused_early = not target.method_allowed or bool(target.problem)
        event, action = kind
        # Which manifest opened (or failed to open) the door belongs in the trail.
        through = f" via KOS {target.manifest[:64]}" if target.manifest else ""
        self.trail.record(AuditEvent(
            event, action, _outcome(status), user, address,
            "" if refused_early else target.audited_study or "",
            detail=f"{method} {path}{through} -> {status}",
            query=query if event is EventType.QUERY else ""))

    def _seen_lately(self, user: str, address: str, study: str) -> bool:
        """True when this client's refresh of ``study`` was audited within the period."""
        now = time.monotonic()
        key = (user, address, study)
        if now - self._refreshed.get(key, -_REFRESH_PERIOD) < _REFRESH_PERIOD:
            return True
        if len(self._refreshed) >= _REFRESH_MEMORY:
            self._refreshed.clear()  # audits more, never less
        self._refreshed[key] = now
        return False
