"""OAuth2 bearer-token access control (RFC 6750) for the HTTP API: JWTs signed by the
configured issuer (keys from its JWKS, RS256 / ES256), rights from the ``scope`` claim.

Which right a request needs: none for ``/health`` (and ``/metrics`` unless configured) and
CORS preflights, ``admin`` under ``/admin``, ``write`` to store (POST under ``/dicom-web``),
``read`` for everything else.
"""

import logging
from dataclasses import dataclass, field
from typing import Literal

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.metrics import AUTH_FAILURES
from gateway.security.tokens import AuthError, TokenVerifier, subject_of
from gateway.web.http.errors import error_response
from gateway.web.http.request_target import Operation, RequestTarget, target_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who a request speaks for: the subject of a verified token, or the name of a client
    certificate known to the configuration; never one for the other, whatever the name."""

    kind: Literal["token", "certificate"]
    name: str

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
        if target.method == "OPTIONS" or target.route in ("/health", "/"):  # "/": a redirect
            return None
        if target.route == "/metrics":
            return self.admin if self.metrics_require_auth else None
        if target.operation is Operation.ADMIN:
            return self.admin
        if target.operation is Operation.STORE:
            return self.write
        return self.read

    def admits(self, principal: Principal) -> bool:
        """Whether ``principal`` may come in at all: a configured certificate always, a
        token subject when there is no allowlist or it is on it."""
        return principal.kind == "certificate" or not self.allowed_subjects \
            or principal.name in self.allowed_subjects


# Key of the scope's state naming why no credential was accepted, for the audit.
CREDENTIALS_REFUSED = "passerelle.credentials_refused"


class AuthMiddleware:
    """Refuses requests without the right token (401 / 403 with ``WWW-Authenticate``); who
    the request speaks for is put in ``scope["user"]`` (its Principal) for the handlers and the
    audit."""

    def __init__(self, app: ASGIApp, verifier: TokenVerifier | None, rights: Rights) -> None:
        self.app = app
        self.verifier = verifier
        self.rights = rights

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = self.rights.required(target_of(scope))
        if needed is not None:
            try:
                await self._authorise(scope, needed)
            except AuthError as exc:
                await self._refuse(scope, exc, needed)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _authorise(self, scope: Scope, needed: str) -> None:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        kind, _, token = header.partition(" ")
        certificate = scope.get("extensions", {}).get("tls", {}).get("client_cert_name", "")
        if kind.lower() == "bearer" and token.strip() and self.verifier is not None:
            claims = await self.verifier.claims(token.strip())
            principal = Principal("token", subject_of(claims))
            scopes = str(claims.get("scope", "")).split()
        elif certificate in self.rights.certificates:
            # mutual TLS: a consumer gateway known by its certificate (verified by the
            # TLS layer against tls_client_ca_file) gets the scopes configured for it.
            principal = Principal("certificate", certificate)
            scopes = self.rights.certificates[certificate]
        else:
            raise AuthError(401, "", "a bearer token is required", "missing")
        scope["user"] = principal  # known from here on, refused or not (audit)
        if not self.rights.admits(principal):
            raise AuthError(403, "insufficient_scope", f"{principal.name!r} is not allowed here",
                            "subject")
        if needed not in scopes:
            raise AuthError(403, "insufficient_scope", f"this request needs scope {needed}",
                            "scope")

    @staticmethod
    def _refuse(scope: Scope, exc: AuthError, needed: str) -> Response:
        AUTH_FAILURES.labels(exc.reason).inc()
        if exc.status != 403:  # no credential accepted (401, or 503: keys unavailable)
            scope.setdefault("state", {})[CREDENTIALS_REFUSED] = exc.reason
        client = scope.get("client") or ("?", 0)
        log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client[0], exc)
        challenge = 'Bearer realm="passerelle"'
        if exc.error:
            challenge += f', error="{exc.error}"'
            if exc.error == "insufficient_scope":
                challenge += f', scope="{needed}"'
        return error_response(scope["path"], exc.status, str(exc),
                              headers={"WWW-Authenticate": challenge})
