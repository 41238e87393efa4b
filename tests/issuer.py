"""A token issuer for the tests: signing keys it generates, their JWKS served over HTTP on
a loopback port (as an OpenID Connect provider publishes it), and JWTs minted on demand.

It is also a minimal OpenID Connect provider for the sign-in tests: a discovery document,
an ``/authorize`` page with a user name field (the users and their scopes are the test's),
and a ``/token`` endpoint that checks what a real one checks: the client (and its secret,
if it has one), the redirect URI, the PKCE code verifier against the S256 challenge, and
that a code is used once and soon."""

import base64
import hashlib
import hmac
import html
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.processes import free_port

AUDIENCE = "passerelle-test"
CLIENT_ID = "passerelle-console"
_CODE_SECONDS = 60


@dataclass(frozen=True)
class Client:
    """A client registered at the issuer."""

    redirect_uri: str
    secret: str = ""  # "": a public client


@dataclass(frozen=True)
class _Grant:
    """An authorization code's request, until the token endpoint takes it."""

    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    user: str
    expires: float


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class LocalIssuer:
    """Issuer ``url`` with one RS256 key (kid ``rsa-1``) and one ES256 key (``ec-1``)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys: dict[str, tuple[object, str]] = {}  # kid -> (private key, algorithm)
        self.published: list[str] = []  # kids in the JWKS
        self.jwks_requests = 0
        self._answering = threading.Event()  # cleared: the JWKS endpoint hangs
        self.body: bytes | None = None  # set: what the JWKS endpoint answers instead
        self._answering.set()
        self.add_key("rsa-1", "RS256")
        self.add_key("ec-1", "ES256")
        self.users: dict[str, str] = {}  # user name -> the scopes of their access tokens
        self.clients: dict[str, Client] = {}
        self.token_seconds = 300  # lifetime of the access tokens /token gives
        self.token_requests: list[dict[str, str]] = []  # the forms /token received
        self._grants: dict[str, _Grant] = {}
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/.well-known/openid-configuration":
                    self._json(200, issuer.discovery())
                    return
                if path == "/authorize":
                    self._page(*issuer.authorize_page(dict(parse_qsl(
                        urlsplit(self.path).query))))
                    return
                issuer.jwks_requests += 1
                if not issuer._answering.is_set():
                    issuer._answering.wait()
                    return  # hung: never answered (its client has gone)
                body = issuer.body or json.dumps(issuer.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(parse_qsl(self.rfile.read(length).decode()))
                path = urlsplit(self.path).path
                if path == "/authorize":
                    location = issuer.authorize(form)
                    if location.startswith("<"):  # the form again, with why
                        self._page(400, location)
                        return
                    self.send_response(302)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/token":
                    self._json(*issuer.exchange(form, self.headers.get("Authorization", "")))
                else:
                    self._json(404, {"error": "not_found"})

            def _json(self, status: int, document: dict) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _page(self, status: int, page: str) -> None:
                body = page.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def jwks_url(self) -> str:
        """Where the keys are published."""
        return f"{self.url}/jwks"

    def settings(self) -> dict[str, str]:
        """The passerelle settings that trust this issuer."""
        return {"auth_issuer": self.url, "auth_jwks_url": self.jwks_url,
                "auth_audience": AUDIENCE}

    def sign_in_settings(self, public_url: str, secret: str = "",
                         client_id: str = CLIENT_ID) -> dict[str, str]:
        """The settings of a service whose console signs in here, its client registered
        with the redirect URI ``{public_url}/ui/callback``."""
        self.clients[client_id] = Client(f"{public_url}/ui/callback", secret)
        return {**self.settings(), "auth_client_id": client_id,
                **({"auth_client_secret": secret} if secret else {})}

    def discovery(self) -> dict:
        """The OpenID Provider Metadata (OpenID Connect Discovery 1.0, 3)."""
        return {"issuer": self.url, "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token", "jwks_uri": self.jwks_url,
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                "code_challenge_methods_supported": ["S256"]}

    def authorize_page(self, query: dict[str, str], problem: str = "") -> tuple[int, str]:
        """(status, page) of the authorization endpoint: the sign-in form, or why not."""
        client = self.clients.get(query.get("client_id", ""))
        if client is None or query.get("redirect_uri") != client.redirect_uri:
            return 400, "<p id='problem'>unknown client or redirect_uri</p>"
        if query.get("response_type") != "code" or query.get("code_challenge_method") \
                != "S256" or not query.get("code_challenge") or not query.get("nonce"):
            return 400, "<p id='problem'>code flow with PKCE S256 and a nonce only</p>"
        hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" '
                         f'value="{html.escape(v)}">' for k, v in query.items())
        return 200, (f"<!DOCTYPE html><title>Test issuer</title><p id='problem'>"
                     f"{html.escape(problem)}</p><form method='post' action='/authorize'>"
                     f"{hidden}<input name='username' id='username'>"
                     "<button type='submit' id='sign-in'>Sign in</button></form>")

    def authorize(self, form: dict[str, str]) -> str:
        """The redirect back to the client with a code for the user the form names, or
        the form again (a page) when the user is unknown."""
        user = form.pop("username", "")
        status, page = self.authorize_page(form, "" if user in self.users else "unknown user")
        if status != 200 or user not in self.users:
            return page
        code = secrets.token_urlsafe(24)
        self._grants[code] = _Grant(form["client_id"], form["redirect_uri"],
                                    form["code_challenge"], form["nonce"], user,
                                    time.time() + _CODE_SECONDS)
        return f"{form['redirect_uri']}?{urlencode({'code': code, 'state': form['state']})}"

    def exchange(self, form: dict[str, str], authorization: str) -> tuple[int, dict]:
        """(status, answer) of the token endpoint for an authorization code."""
        self.token_requests.append(form)
        client_id, secret = form.get("client_id", ""), ""
        if authorization.startswith("Basic "):
            client_id, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        client = self.clients.get(client_id)
        if client is None or not hmac.compare_digest(secret, client.secret):
            return 401, {"error": "invalid_client"}
        grant = self._grants.pop(form.get("code", ""), None)  # a code is used once
        if form.get("grant_type") != "authorization_code" or grant is None \
                or grant.client_id != client_id or grant.expires < time.time() \
                or form.get("redirect_uri") != grant.redirect_uri \
                or _s256(form.get("code_verifier", "")) != grant.challenge:
            return 400, {"error": "invalid_grant"}
        subject = f"sub-{grant.user}"
        expires = int(time.time()) + self.token_seconds
        access = self.token(self.users[grant.user], sub=subject, exp=expires,
                            client_id=client_id, preferred_username=grant.user)
        id_token = self.token(None, aud=client_id, sub=subject, nonce=grant.nonce,
                              azp=client_id, exp=expires, name=grant.user.title())
        return 200, {"access_token": access, "id_token": id_token, "token_type": "Bearer",
                     "expires_in": self.token_seconds}

    def add_key(self, kid: str, algorithm: str, publish: bool = True) -> None:
        """Generate a signing key, published in the JWKS unless told otherwise."""
        key = rsa.generate_private_key(65537, 2048) if algorithm == "RS256" \
            else ec.generate_private_key(ec.SECP256R1())
        self.keys[kid] = (key, algorithm)
        if publish:
            self.published.append(kid)

    def retire(self, kid: str) -> None:
        """Remove a key from the JWKS (the issuer no longer signs with it)."""
        self.published.remove(kid)

    @contextmanager
    def hanging(self) -> Iterator[None]:
        """Within: the JWKS endpoint accepts requests and never answers them."""
        self._answering.clear()
        try:
            yield
        finally:
            self._answering.set()

    def jwks(self) -> dict:
        """The public keys, as a JWK Set."""
        keys = []
        for kid in self.published:
            key, algorithm = self.keys[kid]
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(
                key.public_key()))  # type: ignore[attr-defined]
            keys.append({**jwk, "kid": kid, "alg": algorithm, "use": "sig"})
        return {"keys": keys}

    def token(self, scope: str | None = "dicomweb.read", kid: str = "rsa-1",
              signed_by: str | None = None, **claims: object) -> str:
        """A JWT naming key ``kid``, signed by that key or by key ``signed_by`` (with its
        algorithm); ``claims`` override the defaults (None removes one)."""
        now = int(time.time())
        body = {"iss": self.url, "aud": AUDIENCE, "sub": "899700367909", "scope": scope,
                "iat": now, "nbf": now, "exp": now + 300}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        key, algorithm = self.keys[signed_by or kid]
        return jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid})  # type: ignore[arg-type]

    def __enter__(self) -> "LocalIssuer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
