"""OAuth2 bearer tokens (RFC 6750): JWTs of one OpenID Connect issuer checked against its
JWKS (RS256 / ES256), with ``exp``/``nbf``/``iss``/``aud`` and a clock-skew leeway."""

import logging

import jwt

log = logging.getLogger(__name__)

_ALGORITHMS = ["RS256", "ES256"]
# An unknown key id refetches the JWKS (key rotation), at most this often.
_JWKS_REFETCH_SECONDS = 5


class AuthError(Exception):
    """A request without the right to proceed: its HTTP status and RFC 6750 error code."""

    def __init__(self, status: int, error: str, description: str, reason: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.reason = reason  # metric label



class TokenVerifier:
    """Checks JWTs of one issuer and audience against its JWKS."""

    def __init__(self, issuer: str, jwks_url: str, audience: str, leeway: float) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self._keys = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=10,
                                     cooldown_duration=_JWKS_REFETCH_SECONDS)

    def claims(self, token: str) -> dict:
        """The token's claims; AuthError (401) when it is not valid now for us."""
        try:
            key = self._keys.get_signing_key_from_jwt(token)
            return jwt.decode(token, key=key.key, algorithms=_ALGORITHMS,
                              audience=self.audience, issuer=self.issuer, leeway=self.leeway,
                              options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWKClientConnectionError as exc:
            log.error("cannot fetch the issuer's keys: %s", exc)
            raise AuthError(503, "temporarily_unavailable",
                            "the token issuer's keys cannot be fetched", "jwks") from exc
        except (jwt.PyJWKClientError, jwt.InvalidTokenError) as exc:
            raise AuthError(401, "invalid_token", str(exc) or type(exc).__name__,
                            type(exc).__name__) from exc


def subject_of(claims: dict) -> str:
    """Who the token speaks for: the user (sub), else the client (client_id / azp)."""
    return str(claims.get("sub") or claims.get("client_id") or claims.get("azp") or "")
