"""The client certificate of an HTTPS connection, given to the application as the ASGI TLS
extension (``scope["extensions"]["tls"]["client_cert_name"]``), which uvicorn does not fill.

``ClientCertificateProtocol`` is uvicorn's HTTP/1.1 protocol with that one addition, made
once per connection from the verified peer certificate.
"""

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol


def certificate_name(certificate: dict[str, Any]) -> str:
    """The subject common name of a certificate as ``ssl.SSLSocket.getpeercert`` gives it."""
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _with_client_name(app: ASGIApp, name: str) -> ASGIApp:
    async def tagged(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("extensions", {})["tls"] = {"client_cert_name": name}
        await app(scope, receive, send)

    return tagged


class ClientCertificateProtocol(H11Protocol):
    """HTTP/1.1 over TLS, telling the app who the verified client certificate names."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        """Tag every request of this connection with its client certificate's name."""
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        if certificate:
            self.app = _with_client_name(self.app, certificate_name(certificate))
