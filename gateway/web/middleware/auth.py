"""OAuth2 bearer-token access control (RFC 6750) for the HTTP API: JWTs signed by the
configured issuer (keys from its JWKS, RS256 / ES256), rights from the ``scope`` claim.

Which right a request needs: none for ``/health`` (and ``/metrics`` unless configured), CORS
preflights, the console's sign-in routes and static files; ``admin`` under ``/admin`` and for
every console action (its POSTs and their confirmation pages); ``write`` to store (POST
under ``/dicom-web``); ``read`` for everything else, the console's other pages included.

With sign-in (gateway.web.console.sign_in) a browser's session cookie is a credential too,
for reads (GET, HEAD) of the console, the viewer, DICOMweb, WADO-URI and ``/admin``, and for
the console's POSTs, which carry its form token and origin check; never for another unsafe
request (STOW-RS, the ``/admin`` actions), which a page of another site could make the
browser send with the cookie. A browser asking for a console or viewer page without one is
sent to sign in; API clients keep their 401.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import AUTH_FAILURES
from gateway.security.tokens import AuthError, TokenVerifier, subject_of
from gateway.urls import DICOMWEB_PATH
from gateway.web.http.errors import ADMIN_PATH, error_response
from gateway.web.http.request_target import (
    WADO_URI_PATH,
    Operation,
    RequestTarget,
    target_of,
)
from gateway.web.middleware.session import Sessions

CONSOLE_PATH = "/ui/"
VIEWER_PATH = "/viewer"
# Routes anyone may ask for: "/" is a redirect; the console's sign-in and its static files.
_OPEN_ROUTES = frozenset({"/health", "/", "/ui", "/ui/login", "/ui/callback", "/ui/logout",
                          "/ui/static/{name}"})
# A console page that exists to confirm an action: it needs the right to act.
_CONFIRM_ROUTE = "/ui/studies/{study}/{action}"
# Renders a refusal as a console page: (ASGI scope, status, why) -> response.
RefusalPage = Callable[[Scope, int, str], Response]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who a request speaks for: the subject of a verified token (a bearer token, or the
    access token a browser's session was made from at sign-in), or the name of a client
    certificate known to the configuration; never one for the other, whatever the name."""

    kind: Literal["token", "certificate", "session"]
    name: str
    label: str = field(default="", compare=False)  # the name to show (a session's)
    scopes: frozenset[str] = field(default=frozenset(), compare=False)

    def __str__(self) -> str:
        """How the audit trail names it (``certificate:NAME`` for a certificate)."""
        return f"certificate:{self.name}" if self.kind == "certificate" else self.name


@dataclass(frozen=True)
class Rights:
    """Scope names granting each right, and who may come in at all."""

    read: str
    write: str
    admin: str
    allowed_subjects: frozenset[str] = frozenset()
    metrics_require_auth: bool = False
    certificates: dict[str, frozenset[str]] = field(default_factory=dict)  # name -> scopes

    def required(self, target: RequestTarget) -> str | None:
        """The scope a request needs, or None when it needs no token (HEAD: as GET)."""
        if target.method == "OPTIONS" or target.route in _OPEN_ROUTES:
            return None
        if target.route == "/metrics":
            return self.admin if self.metrics_require_auth else None
        if target.operation is Operation.ADMIN:
            console_page = target.route.startswith(CONSOLE_PATH) \
                and target.method in ("GET", "HEAD") and target.route != _CONFIRM_ROUTE
            return self.read if console_page else self.admin
        if target.operation is Operation.STORE:
            return self.write
        return self.read

    def admits(self, principal: Principal) -> bool:
        """Whether ``principal`` may come in at all: a configured certificate always, a
        token subject when there is no allowlist or it is on it."""
        return principal.kind == "certificate" or not self.allowed_subjects \
            or principal.name in self.allowed_subjects

    def may_act(self, principal: Principal | None) -> bool:
        """Whether ``principal`` may do the console's actions (the admin scope)."""
        return principal is not None and self.admits(principal) \
            and self.admin in principal.scopes


def session_accepted(method: str, path: str) -> bool:
    """Whether a session cookie may stand for a bearer token on this request: reads of the
    console, the viewer, DICOMweb, WADO-URI and /admin, and the console's POSTs."""
    if method in ("GET", "HEAD"):
        return path in (WADO_URI_PATH, VIEWER_PATH, ADMIN_PATH) or path.startswith(
            (CONSOLE_PATH, VIEWER_PATH + "/", DICOMWEB_PATH + "/", ADMIN_PATH + "/"))
    return method == "POST" and path.startswith(CONSOLE_PATH)


def _header(scope: Scope, name: bytes) -> str:
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name),
                "")


def browser_page(scope: Scope) -> bool:
    """Whether a person's browser is asking for a page of the console or the viewer (it
    accepts HTML and sends no Authorization header)."""
    path = scope["path"]
    return (path.startswith(CONSOLE_PATH) or path == VIEWER_PATH
            or path.startswith(VIEWER_PATH + "/")) \
        and "text/html" in _header(scope, b"accept") and not _header(scope, b"authorization")


def _private(send: Send) -> Send:
    """``send`` marking the answer as one person's: a shared cache keeps no answer given
    for a cookie (RFC 9111 3.5 covers an Authorization header only)."""
    async def marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            directives = [d.strip() for d in headers.get("cache-control", "").split(",")
                          if d.strip() and d.strip() != "public"]
            if "no-store" not in directives and "private" not in directives:
                headers["Cache-Control"] = ", ".join(("private", *directives))
            headers.add_vary_header("Cookie")
        await send(message)
    return marked


# Key of the scope's state naming why no credential was accepted, for the audit.
CREDENTIALS_REFUSED = "passerelle.credentials_refused"


class AuthMiddleware:
    """Refuses requests without the right credential (401 / 403 with ``WWW-Authenticate``,
    as a console page for a browser under /ui/; a browser without a session is sent to sign
    in); who the request speaks for is put in ``scope["user"]`` (its Principal) for the
    handlers and the audit."""

    def __init__(self, app: ASGIApp, verifier: TokenVerifier | None, rights: Rights,
                 sessions: Sessions | None = None,
                 refusal_page: RefusalPage | None = None) -> None:
        self.app = app
        self.verifier = verifier
        self.rights = rights
        self.sessions = sessions  # None: no sign-in
        self.refusal_page = refusal_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = self.rights.required(target_of(scope))
        if needed is not None:
            try:
                await self._authorise(scope, needed)
            except AuthError as exc:
                self._note_refusal(scope, exc)
                if exc.status == 401 and self.sessions is not None \
                        and scope["method"] in ("GET", "HEAD") and browser_page(scope):
                    response = self.sessions.sign_in_redirect(scope)
                else:
                    response = self._refuse(scope, exc, needed)
                await response(scope, receive, send)
                return
        user = scope.get("user")
        if isinstance(user, Principal) and user.kind == "session":
            send = _private(send)
        await self.app(scope, receive, send)

    async def _authorise(self, scope: Scope, needed: str) -> None:
        kind, _, token = _header(scope, b"authorization").partition(" ")
        certificate = scope.get("extensions", {}).get("tls", {}).get("client_cert_name", "")
        if kind.lower() == "bearer" and token.strip() and self.verifier is not None:
            claims = await self.verifier.claims(token.strip())
            scopes = frozenset(str(claims.get("scope", "")).split())
            principal = Principal("token", subject_of(claims), scopes=scopes)
        elif certificate in self.rights.certificates:
            # mutual TLS: a consumer gateway known by its certificate (verified by the
            # TLS layer against tls_client_ca_file) gets the scopes configured for it.
            principal = Principal("certificate", certificate,
                                  scopes=self.rights.certificates[certificate])
        elif self.sessions is not None and session_accepted(scope["method"], scope["path"]):
            session = self.sessions.read(scope)
            if session is None:
                # A cookie that does not open (altered, ended, another key's) is a failed
                # authentication of its own kind in the metrics and the audit.
                raise AuthError(401, "", "not signed in, or the session has ended: sign in"
                                if scope["path"].startswith(CONSOLE_PATH)
                                else "a bearer token or a session is required",
                                "session" if self.sessions.presented(scope) else "missing")
            principal = Principal("session", session.subject, session.name, session.scopes)
        else:
            raise AuthError(401, "", "a bearer token is required", "missing")
        scope["user"] = principal  # known from here on, refused or not (audit)
        if not self.rights.admits(principal):
            raise AuthError(403, "insufficient_scope", f"{principal.name!r} is not allowed here",
                            "subject")
        if needed not in principal.scopes:
            raise AuthError(403, "insufficient_scope", f"this request needs scope {needed}",
                            "scope")

    @staticmethod
    def _note_refusal(scope: Scope, exc: AuthError) -> None:
        """Count and log a refusal; one where no credential was accepted (401, or 503: keys
        unavailable) is audited as a failed authentication, aggregated per client, and never
        as an access to what was asked for, also when the browser is sent to sign in."""
        AUTH_FAILURES.labels(exc.reason).inc()
        if exc.status != 403:
            scope.setdefault("state", {})[CREDENTIALS_REFUSED] = exc.reason
        client = scope.get("client") or ("?", 0)
        log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client[0], exc)

    def _refuse(self, scope: Scope, exc: AuthError, needed: str) -> Response:
        challenge = 'Bearer realm="passerelle"'
        if exc.error:
            challenge += f', error="{exc.error}"'
            if exc.error == "insufficient_scope":
                challenge += f', scope="{needed}"'
        if self.refusal_page is not None and scope["path"].startswith(CONSOLE_PATH) \
                and "text/html" in _header(scope, b"accept"):
            response = self.refusal_page(scope, exc.status, str(exc))
            response.headers["WWW-Authenticate"] = challenge
            return response
        return error_response(scope["path"], exc.status, str(exc),
                              headers={"WWW-Authenticate": challenge})
