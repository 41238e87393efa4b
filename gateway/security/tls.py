"""TLS for both listeners (one server certificate, TLS 1.2 at least, optionally client
certificates required from peers) and for the connection to the document registry."""

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _naming(*files: Path | None) -> Iterator[None]:
    """ssl's errors do not say which file is unusable: add it."""
    try:
        yield
    except OSError as exc:  # ssl.SSLError included
        names = ", ".join(str(file) for file in files if file is not None)
        raise OSError(f"TLS file(s) {names}: {exc.strerror or exc}") from exc


def server_context(cert_file: Path, key_file: Path, client_ca_file: Path | None
                   ) -> ssl.SSLContext:
    """A server-side context; raises OSError naming an unusable file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with _naming(cert_file, key_file):
        context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        with _naming(client_ca_file):
            context.load_verify_locations(client_ca_file)
    return context


def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None
                   ) -> ssl.SSLContext:
    """A client-side context checking the server's certificate and host name against
    ``ca_file`` (else the system's CAs), presenting ``cert_file`` when given (mutual TLS);
    raises OSError naming an unusable file."""
    with _naming(ca_file):
        context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        with _naming(cert_file, key_file):
            context.load_cert_chain(cert_file, key_file)
    return context
