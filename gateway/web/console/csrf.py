"""Cross-site request forgery defence of the console's actions.

Every console page sets a random token in a cookie (HttpOnly, SameSite=Strict, Secure over
HTTPS, path ``/ui``) and in each of its forms; an action is done only when the form's token
equals the cookie's, and the browser did not call it a cross-site request (``Origin`` of
another site, ``Sec-Fetch-Site: cross-site``). A page of another site can make the
browser post a form here, but can neither read the token nor send the cookie with it
(SameSite), and its Origin tells it apart (OWASP CSRF cheat sheet: synchronizer token plus
origin check). In the loopback demo mode too: a page open in the operator's browser could
otherwise act on the gateway at 127.0.0.1.
"""

import hmac
import secrets

from starlette.requests import Request
from starlette.responses import Response

from gateway.web.http.origin import foreign_origin

COOKIE = "passerelle_csrf"
FIELD = "csrf"


def token_of(request: Request) -> str:
    """The request's token: the cookie's, or a new one (set it with ``keep``)."""
    token = request.cookies.get(COOKIE, "")
    return token if _valid(token) else secrets.token_urlsafe(32)


def keep(response: Response, request: Request, token: str) -> None:
    """Set (or renew) the token cookie on a page's response."""
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/ui",
                        secure=request.url.scheme == "https")


def refusal(request: Request, form_token: str, public_url: str) -> str:
    """Why an action request must be refused as a forgery; "" when it may be done."""
    foreign = foreign_origin(request, public_url)
    if foreign:
        return foreign
    cookie = request.cookies.get(COOKIE, "")
    if not (_valid(cookie) and hmac.compare_digest(cookie.encode(), form_token.encode())):
        return "missing or wrong form token: reload the page and try again"
    return ""


def _valid(token: str) -> bool:
    return 32 <= len(token) <= 64
