"""Copies of the audit messages to a syslog collector (RFC 5424 messages): over UDP
(RFC 5426), or over TLS (RFC 5425, the transport IHE ATNA requires) with octet-counting
framing. The JSON lines file stays the record; the collector gets a copy.

Over TLS, messages the collector could not take (down, unreachable) wait in a bounded
backlog and are sent on the next successful connection, oldest first; past ``backlog``
messages the oldest are dropped and counted. After a failure the next connection waits
1 s, then twice as long each time up to ``max_retry_seconds``, so a dead collector does
not slow the audit thread down.
"""

import logging
import os
import socket
import ssl
import time
from collections import deque
from datetime import UTC, datetime

from gateway.metrics import AUDIT_SYSLOG_DROPPED

log = logging.getLogger(__name__)



def syslog_message(message: str, app: str) -> bytes:
    """RFC 5424: facility authpriv (10), severity notice (5)."""
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    return (f"<85>1 {stamp} {socket.gethostname()} {app[:48]} {os.getpid()} AUDIT - "
            f"{message}").encode()


class UdpSyslog:
    """RFC 5426: one datagram per message, no acknowledgement."""

    waiting = 0  # nothing is ever kept for later

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, messages: list[bytes]) -> None:
        """Send each message as a datagram (lost, with a log line, if that fails)."""
        for sent, message in enumerate(messages):
            try:
                self._socket.sendto(message, self.address)
            except OSError as exc:
                log.warning("audit syslog %s:%d: %s", *self.address, exc)
                AUDIT_SYSLOG_DROPPED.inc(len(messages) - sent)
                return

    def close(self) -> None:
        """Close the socket."""
        self._socket.close()


class TlsSyslog:
    """RFC 5425: one TLS connection, each message framed as ``LENGTH SP MESSAGE``."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext,
                 timeout: float = 5, max_retry_seconds: float = 60, backlog: int = 10_000
                 ) -> None:
        self.address = address
        self.context = context
        self.timeout = timeout
        self.max_retry_seconds = max_retry_seconds
        self._backlog: deque[bytes] = deque()
        self._limit = backlog
        self._connection: ssl.SSLSocket | None = None
        self._retry_seconds = 0.0
        self._next_attempt = 0.0

    @property
    def waiting(self) -> int:
        """Messages not sent yet."""
        return len(self._backlog)

    def send(self, messages: list[bytes]) -> None:
        """Send the backlog and ``messages``; keep what could not be sent."""
        for message in messages:
            if len(self._backlog) >= self._limit:
                self._backlog.popleft()
                AUDIT_SYSLOG_DROPPED.inc()
            self._backlog.append(message)
        if time.monotonic() < self._next_attempt:
            return
        try:
            connection = self._connection or self._connect()
            while self._backlog:
                message = self._backlog[0]
                connection.sendall(b"%d %b" % (len(message), message))
                self._backlog.popleft()
        except OSError as exc:
            self._disconnect()
            self._retry_seconds = min(max(1.0, 2 * self._retry_seconds), self.max_retry_seconds)
            self._next_attempt = time.monotonic() + self._retry_seconds
            log.warning("audit syslog %s:%d: %s; %d message(s) kept, next try in %g s",
                        *self.address, exc, len(self._backlog), self._retry_seconds)
        else:
            self._retry_seconds = 0.0

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection(self.address, timeout=self.timeout)
        try:
            self._connection = self.context.wrap_socket(raw, server_hostname=self.address[0])
        except OSError:
            raw.close()
            raise
        return self._connection

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        """Try once more to send the backlog, then close the connection."""
        self._next_attempt = 0.0
        if self._backlog:
            self.send([])
        self._disconnect()
