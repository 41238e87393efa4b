"""A syslog collector over TLS (RFC 5425) for the audit tests: it requires a client
certificate, reads octet-counted frames, and keeps each message with the common name of
the certificate that sent it."""

import socket
import ssl
import threading
from pathlib import Path


class TlsSyslogCollector:
    """Listens on ``127.0.0.1:port`` while in its ``with`` block."""

    def __init__(self, port: int, cert: Path, key: Path, client_ca: Path) -> None:
        self.port = port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(client_ca)
        self.received: list[tuple[str, str]] = []  # (sender's common name, message)
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "TlsSyslogCollector":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()

    def messages(self) -> list[str]:
        """What was received so far, in order."""
        return [message for _, message in self.received]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._read, args=(raw,), daemon=True).start()

    def _read(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as connection:
                subject = dict(item[0] for item in connection.getpeercert()["subject"])
                buffer = b""
                while chunk := connection.recv(65536):
                    buffer += chunk
                    while b" " in buffer:
                        length, _, rest = buffer.partition(b" ")
                        if len(rest) < int(length):
                            break
                        self.received.append((subject["commonName"],
                                              rest[:int(length)].decode()))
                        buffer = rest[int(length):]
        except (OSError, ValueError):
            raw.close()
