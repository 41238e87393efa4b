"""OAuth2 bearer tokens (RFC 6750): JWTs of one OpenID Connect issuer checked against its
JWKS (RS256 / ES256), with ``exp``/``nbf``/``iss``/``aud`` and a clock-skew leeway.

The keys are those the JWKS published at its last fetch, and only those: a key the issuer
retires is refused once the JWKS is fetched again. It is fetched in the event loop, never on a
request thread, one fetch at a time, within ``FETCH_SECONDS``: when a token names a key id it
does not list (at most once per ``COOLDOWN_SECONDS``, which follows failed fetches too), and
in the background once it is ``LIFESPAN_SECONDS`` old. A token naming a known key never waits
for a fetch; while the issuer is unreachable, the keys of the last fetch stay in use.
"""

import asyncio
import logging
import math
import time

import httpx
import jwt

from gateway.metrics import JWKS_FETCHES
from gateway.security.issuer_http import fetch_json

log = logging.getLogger(__name__)

_ALGORITHMS = ["RS256", "ES256"]
LIFESPAN_SECONDS = 300
COOLDOWN_SECONDS = 5
FETCH_SECONDS = 5
_MAX_JWKS_BYTES = 1 << 20


class AuthError(Exception):
    """A request without the right to proceed: its HTTP status and RFC 6750 error code."""

    def __init__(self, status: int, error: str, description: str, reason: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.reason = reason  # metric label


def _invalid(description: str, reason: str) -> AuthError:
    return AuthError(401, "invalid_token", description, reason)


def _unknown(kid: str) -> AuthError:
    return _invalid(f"no key {kid[:64]!r} in the issuer's JWKS", "unknown_kid")


def _unavailable() -> AuthError:
    return AuthError(503, "temporarily_unavailable",
                     "the token issuer's keys cannot be fetched", "jwks")


async def _download(url: str) -> object:
    """The JSON document at ``url`` (no redirects, at most ``_MAX_JWKS_BYTES``)."""
    status, document = await fetch_json(url, _MAX_JWKS_BYTES, FETCH_SECONDS)
    if status != 200:
        raise ValueError(f"the JWKS URL answered HTTP {status}")
    return document


def _signing_keys(document: object) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWK Set, by key id (keys without one, or for encryption, left
    out); ValueError, TypeError or a PyJWTError when it is malformed or has none."""
    if not isinstance(document, dict):
        raise ValueError("the JWKS is not a JSON object")
    keys: dict[str, jwt.PyJWK] = {}
    for key in jwt.PyJWKSet.from_dict(document).keys:
        if isinstance(key.key_id, str) and key.public_key_use in ("sig", None):
            keys.setdefault(key.key_id, key)
    if not keys:
        raise ValueError("the JWKS has no signing key with a key id")
    return keys


class IssuerKeys:
    """The issuer's signing keys, as its JWKS published them at the last successful fetch."""

    def __init__(self, jwks_url: str) -> None:
        self.jwks_url = jwks_url
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf  # monotonic time of the last successful fetch
        self._ended_at = -math.inf  # of the last fetch that ended, however
        self._fetch: asyncio.Task[bool] | None = None  # the fetch under way

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key ``kid`` names: AuthError 401 when the JWKS lists none, 503 when the JWKS
        could not be fetched (for this request, or ever)."""
        now = time.monotonic()
        key = self._keys.get(kid)
        if key is not None:
            if now - self._fetched_at > LIFESPAN_SECONDS \
                    and now - self._ended_at > COOLDOWN_SECONDS:
                self._refetch()  # in the background: this request does not wait
            return key
        if self._fetch is None and now - self._ended_at < COOLDOWN_SECONDS:
            if not self._keys:
                raise _unavailable()
            raise _unknown(kid)
        fetched = await asyncio.shield(self._refetch())
        key = self._keys.get(kid)
        if key is not None:
            return key
        if not fetched:
            raise _unavailable()
        raise _unknown(kid)

    def _refetch(self) -> asyncio.Task[bool]:
        """The fetch under way, started if there is none."""
        if self._fetch is None:
            self._fetch = asyncio.get_running_loop().create_task(self._fetch_keys())
        return self._fetch

    async def _fetch_keys(self) -> bool:
        """Replace the keys by those the JWKS publishes now; False when it cannot be fetched
        or has no usable key (the keys stay as they were)."""
        try:
            async with asyncio.timeout(FETCH_SECONDS):
                document = await _download(self.jwks_url)
            keys = _signing_keys(document)
        except (httpx.HTTPError, TimeoutError, TypeError, ValueError, RecursionError,
                jwt.PyJWTError) as exc:  # RecursionError: JSON nested past Python's limit
            log.error("cannot fetch the issuer's keys from %s: %s", self.jwks_url,
                      str(exc) or type(exc).__name__)
            JWKS_FETCHES.labels("failed").inc()
            return False
        finally:
            self._ended_at = time.monotonic()
            self._fetch = None
        if keys.keys() != self._keys.keys():
            log.info("the issuer's keys are now %s", ", ".join(sorted(keys)))
        self._keys, self._fetched_at = keys, self._ended_at
        JWKS_FETCHES.labels("ok").inc()
        return True


class TokenVerifier:
    """Checks JWTs of one issuer and audience against its JWKS."""

    def __init__(self, issuer: str, jwks_url: str, audience: str, leeway: float) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self._keys = IssuerKeys(jwks_url)

    async def claims(self, token: str, audience: str = "") -> dict:
        """The token's claims; AuthError (401) when it is not valid now for us (for
        ``audience``, when given: an ID token's is the client id), whatever is wrong with it
        (503 when the issuer's keys cannot be fetched)."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise _invalid(str(exc) or type(exc).__name__, type(exc).__name__) from exc
        if not isinstance(kid, str):
            raise _invalid("the token names no key id (kid)", "DecodeError")
        key = await self._keys.key(kid)
        try:
            # A PyJWK verifies with its own algorithm only: a header naming another is refused.
            return jwt.decode(token, key=key, algorithms=_ALGORITHMS,
                              audience=audience or self.audience, issuer=self.issuer,
                              leeway=self.leeway,
                              options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            raise _invalid(str(exc) or type(exc).__name__, type(exc).__name__) from exc


def subject_of(claims: dict) -> str:
    """Who the token speaks for: the user (sub), else the client (client_id / azp)."""
    return str(claims.get("sub") or claims.get("client_id") or claims.get("azp") or "")
