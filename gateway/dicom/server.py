"""pynetdicom's association server with the limits a hostile network needs.

- TLS handshakes happen in each association's own thread: pynetdicom does them in its single
  accept thread, where one client that connects and stays silent would stall every peer.
- At most ``per_client`` connections at once from one address; the next one has its
  A-ASSOCIATE-RQ read (not decoded) and answered with an A-ASSOCIATE-RJ, transient,
  local-limit-exceeded (PS3.8 9.3.4), and the server waits briefly for the peer to close.
- At most ``max_associations`` associations served at once, counted from their
  A-ASSOCIATE-RQ: pynetdicom counts every connection's thread, so silent connections from a
  few addresses would lock everyone else out. At most ``max_pending`` connections still
  negotiating; each must send its whole A-ASSOCIATE-RQ within the ARTIM time (PS3.8 9.1.5),
  pynetdicom's timer only runs between PDUs. A slot is free again the moment the connection
  closes: pynetdicom's association thread, left waiting for an A-ASSOCIATE-RQ that will not
  come, is woken then instead of at the end of acse_timeout.
- Each PDU header is checked as it arrives (PS3.8 9.3.1): an unknown PDU type or a length
  over ``max_pdu_bytes`` closes the connection at once. pynetdicom would buffer whatever
  length the peer announces (up to 4 GiB), and after garbage it keeps reading, logging an
  error every 6 bytes, until its ARTIM timer expires.
- Each C-STORE data set is written to a temporary file as its fragments arrive, at most
  ``max_instance_bytes`` of it; the command set and the data set of any other message are
  kept in memory, a few of their bytes only.
"""

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from gateway.security.client_counts import ClientCounts
from storage.part10 import file_preamble_and_meta
from storage.store import IngestResult, io_failure, too_large

log = logging.getLogger(__name__)

# PS3.8 9.3.4: A-ASSOCIATE-RJ PDU (type 03), length 4: reserved, result 2 (rejected-
# transient), source 3 (service-provider, presentation related), reason 2
# (local-limit-exceeded).
_LIMIT_EXCEEDED = struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 2, 3, 2)
_PDU_TYPES = range(0x01, 0x08)  # A-ASSOCIATE-RQ .. A-ABORT
_REJECT_PAUSE_SECONDS = 0.1
# Bytes kept in memory of a DIMSE command set, and of the data set of a message other than
# C-STORE (this SCP serves none that has one); past them the association is aborted.
_COMMAND_BYTES = 64 << 10
_OTHER_DATASET_BYTES = 1 << 20
_FLOOD_LOG_SECONDS = 10


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What the server allows (the [dicom] settings of the same names)."""

    per_client: int
    max_associations: int
    max_pending: int
    artim_seconds: float
    max_pdu_bytes: int


class RefusedPduError(OSError):
    """A PDU header this server will not read further: unknown type, or too long."""


class PduGuard:
    """Replaces an association socket's ``recv``: the DUL reads each PDU as its 6-byte header,
    then the announced length in one call, alternately; every header is checked, and the
    first PDU (the A-ASSOCIATE-RQ) must be complete by ``deadline``."""

    def __init__(self, connection: AssociationSocket, limit: int, peer: str,
                 deadline: float) -> None:
        self.connection = connection
        self.receive = connection.recv
        self.limit = limit
        self.peer = peer
        self.deadline: float | None = deadline  # None once the first PDU is in
        self._header_next = True

    def __call__(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes``; RefusedPduError for a header that must not be followed."""
        data = (self.receive(nr_bytes) if self.deadline is None
                else self._by_deadline(nr_bytes, self.deadline))
        if not self._header_next:
            self._header_next = True
            self.deadline = None
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

    def _by_deadline(self, nr_bytes: int, deadline: float) -> bytearray:
        """``nr_bytes`` (fewer if the peer closes); TimeoutError at ``deadline``, however
        slowly the peer trickles them."""
        sock = cast(socket.socket, self.connection.socket)  # set: the DUL is reading
        timeout = sock.gettimeout()
        data = bytearray()
        try:
            while len(data) < nr_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the ARTIM time is over")
                sock.settimeout(left if timeout is None else min(left, timeout))
                chunk = sock.recv(min(nr_bytes - len(data), 65536))
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            log.warning("closing the connection from %s: no whole A-ASSOCIATE-RQ within "
                        "artim_timeout", self.peer)
            raise
        finally:
            sock.settimeout(timeout)
        return data


class ReceivedDataset:
    """A C-STORE data set written to ``path`` as its fragments arrive, after the preamble and
    File Meta ``header``, up to ``limit`` bytes in all. Past the limit, or on a write error,
    the file is deleted and the rest dropped as it comes: ``refusal`` says why.

    pynetdicom writes it as the file of its STORE_RECV_CHUNKED_DATASET mode (``write``,
    ``file.flush``, and ``close`` then an unlink of ``name`` after the EVT_C_STORE handler).
    """

    def __init__(self, path: Path, header: bytes, limit: int) -> None:
        self.path = path
        self.name = str(path)
        self.limit = limit
        self.size = 0
        self.refusal: IngestResult | None = None
        self._lock = threading.Lock()
        self._claimed = False
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            self._refuse(io_failure(exc))
        self.write(header)

    @property
    def file(self) -> "ReceivedDataset":
        """What pynetdicom flushes after each fragment."""
        return self

    def flush(self) -> None:
        """Nothing to do: fragments are written unbuffered."""

    def write(self, data: bytes) -> None:
        """Append one fragment, or count it only, once refused."""
        self.size += len(data)
        if self.refusal is not None or self._fd is None:
            return
        if self.size > self.limit:
            self._refuse(too_large(self.limit))
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]  # type: ignore[arg-type]
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                log.error("cannot write a received data set to %s: %s", self.path, exc)
            self._refuse(io_failure(exc))

    def claim(self) -> Path:
        """The complete file, now the caller's to store or delete."""
        with self._lock:
            self._close()
            self._claimed = True
            return self.path

    def close(self) -> None:
        """Close the file; delete it unless claimed."""
        with self._lock:
            self._close()
            if not self._claimed:
                self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _refuse(self, why: IngestResult) -> None:
        self.refusal = why
        self.close()


def received_dataset(request: C_STORE) -> ReceivedDataset:
    """The data set of a C-STORE request received by a GuardedAssociationServer."""
    received = request._dataset_file
    if not isinstance(received, ReceivedDataset):
        raise TypeError("C-STORE data set not received by GuardedAssociationServer")
    return received


class StreamingDimse(DIMSEServiceProvider):
    """The DIMSE provider of an association of the server: the data set of a C-STORE-RQ goes
    to a ReceivedDataset in ``new_path()``; what other messages hold in memory is bounded."""

    def __init__(self, assoc: Association, new_path: Callable[[], Path], limit: int) -> None:
        super().__init__(assoc)
        self._new_path = new_path
        self._limit = limit
        self._received: ReceivedDataset | None = None
        self._refused = False

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Decode one P-DATA, a presentation data value at a time, so that a C-STORE's file
        is open before its first data set fragment (PS3.8 E.2: the command comes first)."""
        if self._refused:
            return  # the association is being aborted
        for value in primitive.presentation_data_value_list:
            single = P_DATA()
            single.presentation_data_value_list = [list(value)]
            super().receive_primitive(single)
            message = self.message
            if message is None:
                continue
            if isinstance(message, C_STORE_RQ):
                if message._data_set_file is None:
                    received = self._open(message)
                    message._data_set_file = received  # type: ignore[assignment]
                    message._data_set_path = received.path
            elif (message.encoded_command_set.tell() > _COMMAND_BYTES
                    or message.data_set.tell() > _OTHER_DATASET_BYTES):
                log.warning("aborting the association with %s: a DIMSE message too long",
                            self.assoc.requestor.address)
                self.message = None
                self._refused = True
                self.dul.event_queue.put("Evt19")  # as for an invalid PDU: A-ABORT (PS3.8 9.2)
                return

    def _open(self, message: C_STORE_RQ) -> ReceivedDataset:
        # One operation outstanding at a time (the default asynchronous operations window,
        # PS3.7 D.3.3.3): an earlier data set no handler has taken yet never will be.
        self.discard()
        command = message.command_set
        context = self.assoc._accepted_cx.get(message.context_id)  # type: ignore[arg-type]
        header = file_preamble_and_meta(
            command.AffectedSOPClassUID, command.AffectedSOPInstanceUID,
            context.transfer_syntax[0] if context else "", self.assoc.requestor.ae_title)
        self._received = ReceivedDataset(self._new_path(), header, self._limit)
        return self._received

    def discard(self) -> None:
        """Delete the data set received and not handed over, if any."""
        if self._received is not None:
            self._received.close()
            self._received = None


class GuardedRequestHandler(RequestHandler):
    """Refuses a client over its connection limit; guards the PDUs of the others."""

    server: "GuardedAssociationServer"

    def handle(self) -> None:
        """Start the association, or answer A-ASSOCIATE-RJ if the client has too many."""
        server, host = self.server, self.client_address[0]
        if not server.clients.admit(host):
            log.warning("association from %s refused: %d already open (limit per client)",
                        host, server.clients.limit)
            server.on_refused(host)
            try:
                with contextlib.suppress(OSError):  # the peer left, went silent, failed TLS
                    _reject(self.request, server.limits)
                server.shutdown_request(self.request)
            finally:
                server.settle_pending(None)
            return
        try:
            super().handle()
        except BaseException:
            server.clients.release(host)
            server.settle_pending(None)
            raise

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = self.server
        limits = server.limits
        association_socket = assoc.dul.socket
        association_socket.recv = PduGuard(  # type: ignore[method-assign]
            association_socket, limits.max_pdu_bytes, self.client_address[0],
            time.monotonic() + limits.artim_seconds)
        # pynetdicom's ARTIM is its acse_timeout; it also bounds the wait for a rejected or
        # released peer to close (Sta13).
        assoc.dul.artim_timer.timeout = limits.artim_seconds
        assoc.dimse = StreamingDimse(assoc, server.new_path, server.max_instance_bytes)
        server.negotiating(assoc)
        return assoc


def _reject(connection: socket.socket, limits: ConnectionLimits) -> None:
    """Read the peer's A-ASSOCIATE-RQ, answer A-ASSOCIATE-RJ, wait for the peer to close.

    The PS3.8 9.2 sequence (Sta2 -> Sta3 -> Sta13). Answering before the request arrives, or
    closing the connection before the requestor does, makes clients such as pynetdicom
    report an abort instead of the rejection and its reason. Each wait (for the request,
    for the close) is bounded by the ARTIM time; the request is read, not kept.
    """
    deadline = time.monotonic() + limits.artim_seconds
    pdu_type, _, length = struct.unpack(">BBL", _receive_exactly(connection, 6, deadline))
    if pdu_type != 0x01 or length > limits.max_pdu_bytes:
        return  # not an association request: nothing to answer
    while length:
        length -= len(_receive_exactly(connection, min(length, 65536), deadline))
    # pynetdicom requestors (3.0.4) take an A-ASSOCIATE-RJ that arrives within a few
    # milliseconds of their request for a lost connection, and report an abort.
    time.sleep(_REJECT_PAUSE_SECONDS)
    connection.settimeout(limits.artim_seconds)
    connection.sendall(_LIMIT_EXCEEDED)
    deadline = time.monotonic() + limits.artim_seconds
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
    """A ThreadedAssociationServer with the limits above, made by ``AE.make_server``.
    ``on_refused(host)`` is called for each association refused over the per-client limit,
    ``on_flooded()`` for each connection closed over ``max_pending``; C-STORE data sets go
    to files named by ``new_path()``, ``max_instance_bytes`` of each at most."""

    def __init__(self, *args: Any, limits: ConnectionLimits, new_path: Callable[[], Path],
                 max_instance_bytes: int, on_refused: Callable[[str], None],
                 on_flooded: Callable[[], None], **kwargs: Any) -> None:
        self.limits = limits
        self.clients = ClientCounts(limits.per_client)
        self.new_path = new_path
        self.max_instance_bytes = max_instance_bytes
        self.on_refused = on_refused
        self.on_flooded = on_flooded
        self._slots = threading.Lock()
        self._pending = 0  # connections without an A-ASSOCIATE-RQ yet
        self._negotiating: set[int] = set()  # their associations (id), once made
        self._served: set[int] = set()  # associations counted against max_associations
        self._flood = 0  # connections closed over max_pending since the last log line
        self._flood_logged = 0.0
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)
        self.bind(evt.EVT_REQUESTED, self._on_requested)
        self.bind(evt.EVT_CONN_CLOSE, self._on_close)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; a TLS handshake is left to the association's thread."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Count the connection as pending, or close it (no thread) over max_pending."""
        with self._slots:
            if self._pending < self.limits.max_pending:
                self._pending += 1
                return True
            self._flood += 1
            now = time.monotonic()
            if now - self._flood_logged >= _FLOOD_LOG_SECONDS:
                # One line per period: a flood must not flood the log.
                log.warning("%d connection(s) closed at once, the last from %s: %d still "
                            "negotiating (max_pending_connections)", self._flood,
                            client_address[0], self._pending)
                self._flood, self._flood_logged = 0, now
        self.on_flooded()
        return False

    def negotiating(self, assoc: Association) -> None:
        """``assoc`` holds the pending slot of its connection."""
        with self._slots:
            self._negotiating.add(id(assoc))

    def settle_pending(self, assoc: Association | None) -> None:
        """A pending connection sent its request, or is gone (``None``: it never had an
        association)."""
        with self._slots:
            if assoc is None:
                self._pending -= 1
            elif id(assoc) in self._negotiating:
                self._negotiating.discard(id(assoc))
                self._pending -= 1

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        self.settle_pending(assoc)
        with self._slots:
            admitted = len(self._served) < self.limits.max_associations
            if admitted:
                self._served.add(id(assoc))
        if admitted:
            return
        log.warning("association from %s refused: %d associations served (max_associations)",
                    assoc.requestor.address, self.limits.max_associations)
        assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, local-limit-exceeded (9.3.4)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()  # as pynetdicom's own rejections: until the peer closes, or ARTIM

    def _on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        self.clients.release(assoc.requestor.address)
        self.settle_pending(assoc)
        with self._slots:
            self._served.discard(id(assoc))
        if isinstance(assoc.dimse, StreamingDimse):
            assoc.dimse.discard()
        if assoc.dul.state_machine.current_state == "Sta2":
            # Closed (AA-5) or timed out (AA-2) before any A-ASSOCIATE-RQ: the association
            # thread waits for one until acse_timeout; an empty answer ends it now.
            assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


def pdu_limit(max_pdu: int) -> int:
    """The longest PDU accepted: what we announce as Maximum Length (P-DATA-TF, PS3.8
    D.1), but at least 1 MiB for association PDUs; 64 MiB when the length is unlimited."""
    return max(max_pdu, 1 << 20) if max_pdu else 64 << 20
