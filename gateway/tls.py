"""TLS for both listeners: one server certificate, TLS 1.2 at least, and optionally client
certificates required from peers (signed by ``client_ca``)."""

import ssl
from pathlib import Path


def server_context(cert_file: Path, key_file: Path, client_ca_file: Path | None
                   ) -> ssl.SSLContext:
    """A server-side context; raises OSError / ssl.SSLError naming an unusable file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca_file)
    return context
