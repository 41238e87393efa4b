"""pynetdicom's association server with the limits a hostile network needs.

- TLS handshakes happen in each association's own thread: pynetdicom does them in its single
  accept thread, where one client that connects and stays silent would stall every peer.
- At most ``per_client`` connections at once from one address; the next one has its
  A-ASSOCIATE-RQ read (not decoded) and answered with an A-ASSOCIATE-RJ, transient,
  local-limit-exceeded (PS3.8 9.3.4), and the server waits briefly for the peer to close.
- Each PDU header is checked as it arrives (PS3.8 9.3.1): an unknown PDU type or a length
  over ``max_pdu_bytes`` closes the connection at once. pynetdicom would buffer whatever
  length the peer announces (up to 4 GiB), and after garbage it keeps reading, logging an
  error every 6 bytes, until its ARTIM timer expires.
"""

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from gateway.security.client_counts import ClientCounts

log = logging.getLogger(__name__)

# PS3.8 9.3.4: A-ASSOCIATE-RJ PDU (type 03), length 4: reserved, result 2 (rejected-
# transient), source 3 (service-provider, presentation related), reason 2
# (local-limit-exceeded).
_LIMIT_EXCEEDED = struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 2, 3, 2)
_PDU_TYPES = range(0x01, 0x08)  # A-ASSOCIATE-RQ .. A-ABORT
_ARTIM_SECONDS = 5  # each wait of a rejection (PS3.8 9.1.5)
_REJECT_PAUSE_SECONDS = 0.1


class RefusedPduError(OSError):
    """A PDU header this server will not read further: unknown type, or too long."""


class PduGuard:
    """Wraps an association socket's ``recv``: the DUL reads each PDU as its 6-byte header,
    then the announced length in one call, alternately; every header is checked."""

    def __init__(self, receive: Callable[[int], bytearray], limit: int, peer: str) -> None:
        self.receive = receive
        self.limit = limit
        self.peer = peer
        self._header_next = True

    def __call__(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes``; RefusedPduError for a header that must not be followed."""
        data = self.receive(nr_bytes)
        if not self._header_next:
            self._header_next = True
            return data
        self._header_next = False
        if len(data) == 6:  # shorter: the peer left, the DUL sees it
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type not in _PDU_TYPES:
                raise RefusedPduError(f"not a DICOM PDU from {self.peer} (type 0x{pdu_type:02X})")
            if length > self.limit:
                raise RefusedPduError(f"PDU of {length} bytes announced by {self.peer}; at "
                                      f"most {self.limit} accepted")
        return data


class GuardedRequestHandler(RequestHandler):
    """Refuses a client over its connection limit; guards the PDUs of the others."""

    server: "GuardedAssociationServer"

    def handle(self) -> None:
        """Start the association, or answer A-ASSOCIATE-RJ if the client has too many."""
        host = self.client_address[0]
        if not self.server.clients.admit(host):
            log.warning("association from %s refused: %d already open (limit per client)",
                        host, self.server.clients.limit)
            self.server.on_refused(host)
            with contextlib.suppress(OSError):  # the peer left, went silent, failed TLS
                _reject(self.request, self.server.max_pdu_bytes)
            self.server.shutdown_request(self.request)
            return
        try:
            super().handle()
        except BaseException:
            self.server.clients.release(host)
            raise

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        association_socket = assoc.dul.socket
        association_socket.recv = PduGuard(association_socket.recv, self.server.max_pdu_bytes,
                                           self.client_address[0])
        return assoc


def _reject(connection: socket.socket, max_pdu_bytes: int) -> None:
    """Read the peer's A-ASSOCIATE-RQ, answer A-ASSOCIATE-RJ, wait for the peer to close.

    The PS3.8 9.2 sequence (Sta2 -> Sta3 -> Sta13). Answering before the request arrives, or
    closing the connection before the requestor does, makes clients such as pynetdicom
    report an abort instead of the rejection and its reason. Each wait (for the request,
    for the close) is bounded as by an ARTIM timer; the request is read, not kept.
    """
    deadline = time.monotonic() + _ARTIM_SECONDS
    pdu_type, _, length = struct.unpack(">BBL", _receive_exactly(connection, 6, deadline))
    if pdu_type != 0x01 or length > max_pdu_bytes:
        return  # not an association request: nothing to answer
    while length:
        length -= len(_receive_exactly(connection, min(length, 65536), deadline))
    # pynetdicom requestors (3.0.4) take an A-ASSOCIATE-RJ that arrives within a few
    # milliseconds of their request for a lost connection, and report an abort.
    time.sleep(_REJECT_PAUSE_SECONDS)
    connection.settimeout(_ARTIM_SECONDS)
    connection.sendall(_LIMIT_EXCEEDED)
    deadline = time.monotonic() + _ARTIM_SECONDS
    while _receive(connection, 65536, deadline):  # Sta13: the requestor closes
        pass


def _receive(connection: socket.socket, size: int, deadline: float) -> bytes:
    """At most ``size`` bytes (b"" when the peer has closed); TimeoutError at ``deadline``
    (a ``time.monotonic()`` value)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the peer took too long")
    connection.settimeout(left)
    return connection.recv(size)


def _receive_exactly(connection: socket.socket, size: int, deadline: float) -> bytes:
    """``size`` bytes; ConnectionError if the peer leaves first, TimeoutError at
    ``deadline``."""
    chunks, missing = [], size
    while missing:
        chunk = _receive(connection, missing, deadline)
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


class GuardedAssociationServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer with per-client limits; ``on_refused(host)`` is called
    for each association refused over the limit. Made by ``AE.make_server``."""

    def __init__(self, *args: Any, per_client: int, max_pdu_bytes: int,
                 on_refused: Callable[[str], None], **kwargs: Any) -> None:
        self.clients = ClientCounts(per_client)
        self.max_pdu_bytes = max_pdu_bytes
        self.on_refused = on_refused
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)
        self.bind(evt.EVT_CONN_CLOSE, self._on_close)

    def _on_close(self, event: evt.Event) -> None:
        self.clients.release(event.assoc.requestor.address)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; a TLS handshake is left to the association's thread."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


def pdu_limit(max_pdu: int) -> int:
    """The longest PDU accepted: what we announce as Maximum Length (P-DATA-TF, PS3.8
    D.1), but at least 1 MiB for association PDUs; 64 MiB when the length is unlimited."""
    return max(max_pdu, 1 << 20) if max_pdu else 64 << 20
