"""uvicorn's HTTP/1.1 protocol with what a server facing hostile clients needs and uvicorn
lacks, per connection:

- a deadline for each request's head (request line and headers): uvicorn only closes idle
  keep-alive connections, and any byte restarts that timer, so a client sending its
  headers a byte at a time (slowloris) would hold a connection, and one of the
  ``http_max_connections``, for ever;
- at most ``max_per_client`` open connections per client address; the next one is answered
  429 and closed before its request is read;
- at most ``h11_max_incomplete_event_size`` bytes (uvicorn's setting, 16 KiB here) in a
  request's head, complete or not: h11 bounds only a head still incomplete, so a whole head
  arriving in one read would pass at any size. Over it: 400, uvicorn's answer to any
  malformed request, and the connection closed;
- the verified TLS client certificate's name for the application (``ClientCertificateProtocol``).
"""

import asyncio
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import h11

from gateway import metrics
from gateway.security.client_counts import ClientCounts
from gateway.web.http.tls_identity import ClientCertificateProtocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # a request's line and headers, the blank line included
_HEAD_END = re.compile(b"\n\r?\n")  # where h11 ends a head (h11._receivebuffer)

_TOO_MANY = b"too many connections from this address\n"
TOO_MANY_RESPONSE = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\n"
                     b"retry-after: 1\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%b" % (len(_TOO_MANY), _TOO_MANY))


class HeadLimitedConnection(h11.Connection):
    """h11's server side, refusing a request head of more than ``max_head`` bytes before
    parsing it; ``on_refused`` is told."""

    def __init__(self, max_head: int, on_refused: Callable[[], None]) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self.on_refused = on_refused

    def next_event(self) -> Any:
        """h11's next event; RemoteProtocolError when a head waiting to be parsed, or the
        bytes buffered towards one, run past ``max_head``."""
        if self.their_state is h11.IDLE:
            buffered, _ = self.trailing_data
            if len(buffered) > self.max_head and \
                    _HEAD_END.search(buffered, 0, self.max_head) is None:
                self.on_refused()
                raise h11.RemoteProtocolError(f"request head over {self.max_head} bytes",
                                              error_status_hint=431)
        return super().next_event()


class GuardedHttpProtocol(ClientCertificateProtocol):
    """One HTTP connection. ``head_timeout``: seconds to receive a request's head, counted
    from the connection (or from the end of the previous response plus the keep-alive
    time); ``per_client``: open connections by address, shared by every connection of a
    server (``self.connections`` is uvicorn's set of all of them)."""

    def __init__(self, *args: Any, head_timeout: float, per_client: ClientCounts,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout
        self.per_client = per_client
        self._address = ""
        self._counted = False
        self._head_deadline: asyncio.TimerHandle | None = None
        self.max_head = self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES
        self.conn = HeadLimitedConnection(self.max_head, self._head_too_large)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        """Refuse a client over its connection limit; otherwise start the head deadline."""
        super().connection_made(transport)
        self._address = self.client[0] if self.client else ""
        if not self.per_client.admit(self._address):
            log.warning("HTTP connection from %s refused: %d already open", self._address,
                        self.per_client.limit)
            metrics.HTTP_CONNECTIONS_CLOSED.labels("per_client_limit").inc()
            transport.write(TOO_MANY_RESPONSE)
            transport.close()
            return
        self._counted = True
        self._arm(self.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        super().connection_lost(exc)
        self._disarm()
        if self._counted:
            self._counted = False
            self.per_client.release(self._address)

    def data_received(self, data: bytes) -> None:
        """Stop the head deadline once a whole request head has arrived."""
        super().data_received(data)
        self._disarm_when_head_received()

    def on_response_complete(self) -> None:
        """The next request's head must arrive within keep-alive + head timeout."""
        self._arm(self.timeout_keep_alive + self.head_timeout)
        super().on_response_complete()  # may start a pipelined request at once
        self._disarm_when_head_received()

    def _disarm_when_head_received(self) -> None:
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(seconds, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_large(self) -> None:
        log.warning("HTTP request from %s refused: its head is over %d bytes", self._address,
                    self.max_head)
        metrics.HTTP_CONNECTIONS_CLOSED.labels("head_too_large").inc()

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.warning("HTTP connection from %s closed: no complete request head within "
                        "the time allowed", self._address)
            metrics.HTTP_CONNECTIONS_CLOSED.labels("head_timeout").inc()
            self.transport.close()


def guarded_protocol(head_timeout: float, per_client: ClientCounts
                     ) -> Callable[..., GuardedHttpProtocol]:
    """The protocol factory for ``uvicorn.Config(http=...)``: one per server; ``per_client``
    counts the open connections of each client address."""
    return functools.partial(GuardedHttpProtocol, head_timeout=head_timeout,
                             per_client=per_client)
