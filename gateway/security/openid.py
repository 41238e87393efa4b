"""OpenID Connect sign-in of a browser (authorization code flow with PKCE: OpenID Connect
Core 1.0 3.1, RFC 7636 S256), as a relying party of the configured issuer.

Authlib builds the protocol's messages (the authorization request with its PKCE challenge,
the token request and the client's authentication at the token endpoint) and checks the ID
token's OpenID claims (nonce, azp, at_hash); the signatures are checked by TokenVerifier
against the issuer's JWKS. The rights come from the access token alone, verified exactly as
a bearer token of the API is (issuer, audience, expiry, ``scope``). The issuer's answers are
bounded (gateway.security.issuer_http); its discovery document is fetched again after an
hour.
"""

import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import jwt
from authlib.common.security import generate_token
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc.errors import JoseError

from gateway.config import AuthSettings
from gateway.security.issuer_http import IssuerAnswerError, fetch_json
from gateway.security.tokens import AuthError, TokenVerifier

log = logging.getLogger(__name__)

DISCOVERY_SECONDS = 3600
TIMEOUT_SECONDS = 10
_MAX_DISCOVERY_BYTES = 256 << 10
_MAX_TOKEN_BYTES = 64 << 10
_MAX_NAME = 100
_MAX_SUBJECT = 255  # OpenID Connect Core 2: sub is at most 255 ASCII characters


class SignInError(Exception):
    """Sign-in cannot go on: the message says why, to the person signing in."""


@dataclass(frozen=True)
class LoginRequest:
    """What the browser keeps (sealed) from the authorization request to its answer."""

    state: str
    nonce: str
    verifier: str  # the PKCE code verifier
    next: str  # the page to go back to

    @classmethod
    def new(cls, next_path: str) -> "LoginRequest":
        """A request with fresh random state, nonce and code verifier (RFC 7636 4.1:
        43 to 128 unreserved characters)."""
        return cls(generate_token(32), generate_token(32), generate_token(64), next_path)


@dataclass(frozen=True)
class Identity:
    """Who signed in, and the rights of the access token they came with."""

    subject: str
    name: str
    scopes: frozenset[str]
    expires: float  # the access token's exp


def _endpoint(document: dict, name: str) -> str:
    """The URL of endpoint ``name``: https, or http on this machine (tests, demos)."""
    url = document.get(name)
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        host = parts.hostname if parts else None
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = host = None
    if parts is None or not host or not (
            parts.scheme == "https"
            or (parts.scheme == "http" and host in ("127.0.0.1", "localhost", "::1"))):
        raise SignInError(f"the issuer's discovery document gives no usable https {name}")
    return str(url)


class RelyingParty:
    """Signs browsers in at ``auth.issuer`` as client ``auth.client_id``."""

    def __init__(self, auth: AuthSettings, redirect_uri: str, verifier: TokenVerifier) -> None:
        self.auth = auth
        self.redirect_uri = redirect_uri
        self.verifier = verifier
        self.scope = " ".join(dict.fromkeys(("openid", "profile", auth.read_scope,
                                             auth.admin_scope)))
        self._endpoints: tuple[str, str] | None = None  # authorization, token
        self._fetched_at = 0.0

    async def _provider(self) -> tuple[str, str]:
        """(authorization endpoint, token endpoint) of the issuer's discovery document,
        whose ``issuer`` must be ours (OpenID Connect Discovery 4.3)."""
        if self._endpoints and time.monotonic() - self._fetched_at < DISCOVERY_SECONDS:
            return self._endpoints
        try:
            status, document = await fetch_json(self.auth.discovery_url,
                                                _MAX_DISCOVERY_BYTES, TIMEOUT_SECONDS)
        except (httpx.HTTPError, httpx.InvalidURL, IssuerAnswerError, TimeoutError) as exc:
            log.error("cannot read the issuer's discovery document %s: %s",
                      self.auth.discovery_url, str(exc) or type(exc).__name__)
            raise SignInError("the sign-in service cannot be reached") from exc
        if status != 200 or not isinstance(document, dict):
            raise SignInError(f"the issuer's discovery document answered HTTP {status}")
        if document.get("issuer") != self.auth.issuer:
            raise SignInError("the issuer's discovery document names another issuer")
        methods = document.get("code_challenge_methods_supported")  # absent: not said
        if methods is not None and not (isinstance(methods, list) and "S256" in methods):
            raise SignInError("the issuer does not support PKCE with S256")
        self._endpoints = (_endpoint(document, "authorization_endpoint"),
                           _endpoint(document, "token_endpoint"))
        self._fetched_at = time.monotonic()
        return self._endpoints

    async def authorization_url(self, login: LoginRequest) -> str:
        """Where to send the browser to sign in."""
        authorization, _ = await self._provider()
        return prepare_grant_uri(
            authorization, self.auth.client_id, "code", self.redirect_uri, self.scope,
            login.state, nonce=login.nonce,
            code_challenge=create_s256_code_challenge(login.verifier),
            code_challenge_method="S256")

    async def identity(self, code: str, login: LoginRequest) -> Identity:
        """Exchange the authorization ``code`` at the token endpoint (with the PKCE code
        verifier); who the ID token says signed in, with the access token's rights."""
        _, token_url = await self._provider()
        body = prepare_token_request("authorization_code", code=code,
                                     redirect_uri=self.redirect_uri,
                                     code_verifier=login.verifier)
        # A confidential client authenticates with HTTP Basic; a public one names itself.
        _, headers, body = ClientAuth(
            self.auth.client_id, self.auth.client_secret,
            "client_secret_basic" if self.auth.client_secret else "none").prepare(
                "POST", token_url, {"Content-Type": "application/x-www-form-urlencoded"},
                body)
        try:
            status, tokens = await fetch_json(token_url, _MAX_TOKEN_BYTES, TIMEOUT_SECONDS,
                                              body=body.encode(), headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL, IssuerAnswerError, TimeoutError) as exc:
            log.error("token request to %s failed: %s", token_url,
                      str(exc) or type(exc).__name__)
            raise SignInError("the sign-in service cannot be reached") from exc
        if not isinstance(tokens, dict):
            raise SignInError(f"the token endpoint answered HTTP {status}, not a JSON object")
        if status != 200 or "error" in tokens:
            raise SignInError(f"the issuer refused the sign-in: "
                              f"{str(tokens.get('error', status))[:100]}")
        access, id_token = tokens.get("access_token"), tokens.get("id_token")
        if not (isinstance(access, str) and isinstance(id_token, str)
                and str(tokens.get("token_type", "")).lower() == "bearer"):
            raise SignInError("the token endpoint gave no bearer access token and ID token")
        try:
            person = await self._id_claims(id_token, access, login.nonce)
            claims = await self.verifier.claims(access)
        except AuthError as exc:
            raise SignInError(f"the issuer's tokens are not valid here: {exc}") from exc
        subject = str(person["sub"])
        if claims.get("sub") not in (None, subject):
            raise SignInError("the ID token and the access token name different users")
        if len(subject) > _MAX_SUBJECT:
            raise SignInError("the user's subject is longer than 255 characters")
        name = person.get("name") or person.get("preferred_username") or subject
        return Identity(subject, str(name)[:_MAX_NAME],
                        frozenset(str(claims.get("scope", "")).split()), float(claims["exp"]))

    async def _id_claims(self, id_token: str, access_token: str, nonce: str) -> dict:
        """The ID token's claims: signed by the issuer for this client, its nonce ours
        (OpenID Connect Core 3.1.3.7)."""
        claims = await self.verifier.claims(id_token, audience=self.auth.client_id)
        try:
            CodeIDToken(claims, jwt.get_unverified_header(id_token),
                        params={"nonce": nonce, "client_id": self.auth.client_id,
                                "access_token": access_token}).validate(
                int(time.time()), int(self.auth.leeway_seconds))
        except JoseError as exc:
            raise AuthError(401, "invalid_token", f"ID token: {exc}", "id_token") from exc
        if not claims.get("sub"):
            raise AuthError(401, "invalid_token", "the ID token names no subject", "id_token")
        return claims
