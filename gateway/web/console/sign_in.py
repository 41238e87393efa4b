"""Sign-in of the console and the viewer with OpenID Connect (gateway.security.openid):

- ``/ui/login?next=PATH``: to the issuer's authorization endpoint (code flow, PKCE S256,
  state and nonce), the request kept in a sealed cookie (``passerelle_login``: HttpOnly,
  Secure, SameSite=Lax so that the issuer's redirect back, a cross-site navigation,
  carries it; path ``/ui/callback``; 10 minutes);
- ``/ui/callback``: the issuer's answer: state checked, code exchanged, tokens verified,
  the session cookie set (gateway.web.middleware.session), back to ``next``;
- ``/ui/logout`` (POST, with the console's form token): the session cookie cleared.

``next`` is a path of this service only (no scheme, no host, no ``//``): never a redirect
elsewhere. Each sign-in and sign-out is audited (User Authentication) with the subject.
"""

import hmac
import time
from dataclasses import asdict, dataclass
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.security.audit import AuditEvent, EventType, Outcome
from gateway.security.openid import LoginRequest, RelyingParty, SignInError
from gateway.web.admin import BodyTooLargeError, small_body
from gateway.web.console import csrf
from gateway.web.console.pages import refused, render
from gateway.web.middleware.auth import Principal
from gateway.web.middleware.session import Sealer, Session, Sessions
from gateway.web.services import services_of

LOGIN_COOKIE = "passerelle_login"
CALLBACK_PATH = "/ui/callback"
HOME = "/ui/"
_LOGIN_SECONDS = 600  # from the redirect to the issuer to its answer
_MAX_NEXT = 2000
_NEXT_PREFIXES = ("/ui/", "/viewer")


@dataclass(frozen=True)
class SignIn:
    """What the sign-in routes work with (``app.state.sign_in``)."""

    party: RelyingParty
    sessions: Sessions
    logins: Sealer  # seals the login request kept by the browser


def _sign_in_of(request: Request) -> SignIn:
    return request.app.state.sign_in


def safe_next(value: str) -> str:
    """``value`` when it is a path of the console or the viewer, else the console's home:
    no scheme, no host, no ``//`` or backslash a browser would read as another host."""
    if len(value) > _MAX_NEXT or not value.startswith(_NEXT_PREFIXES) or "\\" in value \
            or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return HOME
    parts = urlsplit(value)
    return HOME if parts.scheme or parts.netloc or value.startswith("//") else value


def _login_cookie(response: Response, value: str = "", max_age: int = 0) -> None:
    attributes = {"path": CALLBACK_PATH, "secure": True, "httponly": True, "samesite": "lax"}
    if value:
        response.set_cookie(LOGIN_COOKIE, value, max_age=max_age, **attributes)
    else:
        response.delete_cookie(LOGIN_COOKIE, **attributes)


def _audit(request: Request, outcome: Outcome, user: Principal | str, detail: str) -> None:
    services_of(request).audit.record(AuditEvent(
        EventType.USER_AUTHENTICATION, "E", outcome, user,
        (request.client.host if request.client else ""), detail=detail))


async def login(request: Request) -> Response:
    """To the issuer's sign-in page."""
    sign_in = _sign_in_of(request)
    asked = LoginRequest.new(safe_next(request.query_params.get("next", "")))
    try:
        url = await sign_in.party.authorization_url(asked)
    except SignInError as exc:
        return refused(request, str(exc), 503)
    response = RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})
    _login_cookie(response, sign_in.logins.seal(asdict(asked), time.time() + _LOGIN_SECONDS),
                  _LOGIN_SECONDS)
    return response


def _failed(request: Request, why: str, status: int) -> Response:
    _audit(request, Outcome.MINOR_FAILURE, "anonymous", f"sign-in: {why[:200]}")
    response = render(request, "message.html", status=status, message=("sign_in_failed", why))
    _login_cookie(response)
    return response


async def callback(request: Request) -> Response:
    """The issuer's answer: signed in and back to the page asked for, or why not."""
    sign_in, params = _sign_in_of(request), request.query_params
    opened = sign_in.logins.open(request.cookies.get(LOGIN_COOKIE, ""))
    try:
        asked = LoginRequest(**opened[0]) if opened else None
    except TypeError:  # fields of another version
        asked = None
    if asked is None or not hmac.compare_digest(
            params.get("state", "").encode("utf-8", "replace"), asked.state.encode()):
        return _failed(request, "this sign-in has expired or was started elsewhere", 400)
    if "error" in params:
        return _failed(request, f"the issuer answered {params['error'][:100]}", 403)
    try:
        identity = await sign_in.party.identity(params.get("code", "")[:4096], asked)
    except SignInError as exc:
        return _failed(request, str(exc), 403)
    rights = request.app.state.rights
    principal = Principal("session", identity.subject, identity.name,
                          identity.scopes & {rights.read, rights.write, rights.admin})
    if not rights.admits(principal):
        return _failed(request, f"{identity.subject!r} is not allowed here", 403)
    if rights.read not in principal.scopes:  # a session that could open no page
        return _failed(request, f"{identity.subject!r} has no right here (scope "
                       f"{rights.read} is needed to see the console and the images)", 403)
    response = RedirectResponse(asked.next, status_code=303)
    if not sign_in.sessions.start(response, Session(principal.name, principal.label,
                                                    principal.scopes, identity.expires)):
        return _failed(request, "the access token has already expired, or is too large", 403)
    _login_cookie(response)
    _audit(request, Outcome.SUCCESS, principal, "sign-in")
    return response


async def logout(request: Request) -> Response:
    """Sign out: the session cookie cleared (a POST with the console's form token)."""
    try:
        form = dict(parse_qsl((await small_body(request)).decode("utf-8", "replace"),
                              max_num_fields=8))
    except (BodyTooLargeError, ValueError) as exc:
        return refused(request, str(exc), 400)
    forged = csrf.refusal(request, form.get(csrf.FIELD, ""), services_of(request).public_url)
    if forged:
        return refused(request, forged, 403)
    session = _sign_in_of(request).sessions.read(request.scope)
    if session is not None:
        _audit(request, Outcome.SUCCESS, Principal("session", session.subject), "sign-out")
    response = render(request, "message.html", message=("signed_out", ""))
    Sessions.end(response)
    return response


ROUTES = [
    Route("/ui/login", login, methods=["GET"]),
    Route(CALLBACK_PATH, callback, methods=["GET"]),
    Route("/ui/logout", logout, methods=["POST"]),
]
