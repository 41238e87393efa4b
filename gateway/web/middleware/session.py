"""The browser's session after sign-in (gateway.web.console.sign_in): a cookie the service
signs, holding who the user is (the access token's subject, a name to show), the rights of
the access token it was made from, and when it ends. It lives no longer than that token,
nor than ``auth_session_max_age_seconds``; nothing is kept on the server, so every HTTP
worker, replica or restart that has the same key accepts it.

Cookie ``passerelle_session``: HttpOnly (no script reads it), Secure (browsers keep it over
https, and on http://127.0.0.1 or localhost, which they trust as secure), SameSite=Lax,
path ``/``. Lax, not Strict: a person following a link from another application (the
shared record, a mail) to a study's page must arrive signed in, and the issuer's redirect
back after sign-in, itself cross-site, must not be sent to sign in again. Lax withholds the
cookie from every cross-site request but top-level navigations (GET): a POST, a script's
fetch or an image of another site comes without it. That is enough because the session is
accepted for reads (GET, HEAD) and for the console's POSTs alone, and those carry the
console's form token and are refused when the browser names another origin
(gateway.web.console.csrf); never for STOW-RS or the /admin actions (bearer tokens only,
gateway.web.middleware.auth).
"""

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.requests import HTTPConnection
from starlette.responses import RedirectResponse, Response
from starlette.types import Scope

from gateway.config import AuthSettings
from gateway.security import key_file

COOKIE = "passerelle_session"
KEY_FILE = "session.key"
LOGIN_PATH = "/ui/login"
MAX_COOKIE_CHARS = 4000  # browsers keep 4096 bytes per cookie, name and attributes included


def session_key(auth: AuthSettings, data_dir: Path) -> bytes:
    """The key signing the session cookies: ``auth_session_secret``, else the random key
    of the data dir (created on first use, shared by every process of the service)."""
    if auth.session_secret:
        return auth.session_secret.encode()
    return key_file.load_or_create(data_dir / KEY_FILE)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sealer:
    """Signs small JSON objects with an end time into cookie values (HMAC-SHA256), each
    purpose with a key of its own: a value sealed for one purpose opens for no other."""

    def __init__(self, key: bytes, purpose: str) -> None:
        self._key = hmac.new(key, f"passerelle {purpose}".encode(), hashlib.sha256).digest()

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def seal(self, fields: dict[str, Any], expires: float) -> str:
        """A cookie value holding ``fields`` until ``expires`` (epoch seconds)."""
        payload = _b64(json.dumps({"f": fields, "exp": int(expires)},
                                  separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def open(self, value: str, now: float | None = None
             ) -> tuple[dict[str, Any], int] | None:
        """(fields, end time) sealed in ``value``; None when it is not one of ours, was
        altered, or has ended."""
        payload, dot, mac = value.partition(".")
        if not dot or len(value) > MAX_COOKIE_CHARS or not payload.isascii() \
                or not hmac.compare_digest(mac.encode("ascii", "replace"),
                                           self._mac(payload).encode()):
            return None
        try:
            sealed = json.loads(_unb64(payload))
        except (ValueError, binascii.Error):
            return None
        if not isinstance(sealed, dict) or not isinstance(sealed.get("f"), dict) \
                or not isinstance(sealed.get("exp"), int) \
                or sealed["exp"] <= (time.time() if now is None else now):
            return None
        return sealed["f"], sealed["exp"]


@dataclass(frozen=True)
class Session:
    """Who a browser is signed in as, until when."""

    subject: str  # the access token's subject: how the audit trail names the user
    name: str  # what the console shows
    scopes: frozenset[str]  # those of the access token this service grants rights by
    expires: float


def cookie_attributes() -> dict[str, Any]:
    """The attributes of the session cookie (the same to set and to clear it)."""
    return {"path": "/", "secure": True, "httponly": True, "samesite": "lax"}


class Sessions:
    """Opens and sets the session cookie."""

    def __init__(self, key: bytes, max_age_seconds: float) -> None:
        self._sealer = Sealer(key, "session")
        self.max_age_seconds = max_age_seconds

    def read(self, scope: Scope) -> Session | None:
        """The request's session; None when it has none valid now."""
        value = HTTPConnection(scope).cookies.get(COOKIE, "")
        opened = self._sealer.open(value) if value else None
        if opened is None:
            return None
        fields, expires = opened
        subject, name, scopes = fields.get("sub"), fields.get("name"), fields.get("scp")
        started = fields.get("iat")
        if not (isinstance(subject, str) and subject and isinstance(name, str)
                and isinstance(scopes, list) and all(isinstance(s, str) for s in scopes)
                and isinstance(started, int)):
            return None
        # The maximum age holds whatever end time a cookie was sealed with (one sealed
        # before the setting was lowered, or with a key that leaked from a backup).
        if time.time() - started > self.max_age_seconds:
            return None
        return Session(subject, name, frozenset(scopes), float(expires))

    @staticmethod
    def presented(scope: Scope) -> bool:
        """Whether the request carries a session cookie at all (valid or not)."""
        return COOKIE in HTTPConnection(scope).cookies

    def start(self, response: Response, session: Session, now: float | None = None) -> bool:
        """Set the session cookie, to end with ``session`` or after the maximum age,
        whichever first; False when that leaves no time or the cookie would be too large."""
        now = time.time() if now is None else now
        expires = min(session.expires, now + self.max_age_seconds)
        value = self._sealer.seal({"sub": session.subject, "name": session.name,
                                   "scp": sorted(session.scopes), "iat": int(now)}, expires)
        if int(expires) - int(now) < 1 or len(value) > MAX_COOKIE_CHARS:
            return False
        response.set_cookie(COOKIE, value, max_age=int(expires) - int(now),
                            **cookie_attributes())
        return True

    @staticmethod
    def end(response: Response) -> None:
        """Clear the session cookie."""
        response.delete_cookie(COOKIE, **cookie_attributes())

    @staticmethod
    def sign_in_redirect(scope: Scope) -> Response:
        """To sign in, then back to the page asked for; a session cookie that did not open
        (altered, ended, another key's) is cleared."""
        wanted = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}"
                                  if scope.get("query_string") else "")
        response = RedirectResponse(f"{LOGIN_PATH}?next={quote(wanted, safe='')}",
                                    status_code=303, headers={"Cache-Control": "no-store"})
        if Sessions.presented(scope):
            Sessions.end(response)
        return response
