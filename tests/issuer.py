"""A token issuer for the tests: signing keys it generates, their JWKS served over HTTP on
a loopback port (as an OpenID Connect provider publishes it), and JWTs minted on demand."""

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.processes import free_port

AUDIENCE = "passerelle-test"


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
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
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

    def token(self, scope: str = "dicomweb.read", kid: str = "rsa-1",
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
