"""pynetdicom's association server with the limits a hostile network needs (the pynetdicom
internals this takes are all in ``pynetdicom_adapter``).

- TLS handshakes happen in each association's own thread: pynetdicom does them in its single
  accept thread, where one client that connects and stays silent would stall every peer.
- At most ``per_client`` connections at once from one address; the next one gives up its
  pending slot at once, has its A-ASSOCIATE-RQ read (not decoded) and answered with an
  A-ASSOCIATE-RJ, transient, local-limit-exceeded (PS3.8 9.3.4), and the server waits
  briefly for the peer to close; at most ``_COURTESY_REJECTIONS`` such answers at a time,
  past them the connection is closed at once.
- At most ``max_associations`` associations served at once, counted from their
  A-ASSOCIATE-RQ: pynetdicom counts every connection's thread, so silent connections from a
  few addresses would lock everyone else out. At most ``max_pending`` connections still
  negotiating; each must send its whole A-ASSOCIATE-RQ within the ARTIM time (PS3.8 9.1.5),
  pynetdicom's timer only runs between PDUs. A connection's slots are free again the moment
  it closes, and in any case when its association thread ends (pynetdicom reports no close
  when its reader thread dies of an error). These limits, and the one per client, hold
  over every receiver process of the service when they are shared (``slots``,
  ``clients``).
- Given a ``listener`` (the supervisor's, which every receiver process accepts on), the
  server neither binds nor shuts it down, and leaves a waiting connection to a less busy
  receiver for a moment (gateway.dicom.slots).
- Each accepted socket has TCP_NODELAY, and TCP_QUICKACK (Linux) again before each PDU is
  read: a sender that keeps Nagle's algorithm on (dcmtk's default) holds its next small
  segment until the last one is acknowledged, and a receiver that has just answered delays
  that acknowledgement (40 ms or more), once per instance.
- Each PDU header is checked as it arrives (PS3.8 9.3.1): an unknown PDU type or a length
  over ``max_pdu_bytes`` closes the connection at once. pynetdicom would buffer whatever
  length the peer announces (up to 4 GiB), and after garbage it keeps reading, logging an
  error every 6 bytes, until its ARTIM timer expires.
- Each C-STORE data set is written to a temporary file of the blob store as its fragments
  arrive, at most ``max_instance_bytes`` of it; the command set of every message (64 KiB)
  and the data set of any other message (1 MiB) are bounded in memory, past them, or for a
  message that cannot be decoded (a C-STORE-RQ without its UIDs), the association is
  aborted.
"""

import contextlib
import errno
import gc
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from gateway.dicom.pynetdicom_adapter import (
    AdaptedRequestHandler,
    StreamingDimse,
    announce_close,
    call_when_ended,
    dataset_sink,
    guard_receive,
    reject_association,
    use_dimse,
    wait_instead_of_polling,
    wake_if_negotiating,
)
from gateway.dicom.slots import AssociationSlots
from gateway.imaging.budget import ByteBudget, OverBudget
from gateway.security.client_counts import ClientCounts
from storage.blobs import BlobTooLargeError, TemporaryBlob
from storage.part10 import file_preamble_and_meta
from storage.store import IngestResult, io_failure, too_large

log = logging.getLogger(__name__)

# PS3.8 9.3.4: A-ASSOCIATE-RJ PDU (type 03), length 4: reserved, result 2 (rejected-
# transient), source 3 (service-provider, presentation related), reason 2
# (local-limit-exceeded).
_LIMIT_EXCEEDED = struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 2, 3, 2)
_PDU_TYPES = range(0x01, 0x08)  # A-ASSOCIATE-RQ .. A-ABORT
_REJECT_PAUSE_SECONDS = 0.1
# Connections over their client's limit answered A-ASSOCIATE-RJ at once, all addresses
# together (each holds a thread up to twice the ARTIM time); the others are closed at once.
_COURTESY_REJECTIONS = 16
# Bytes kept in memory of a DIMSE command set, and of the data set of a message other than
# C-STORE (this SCP serves none that has one); past them the association is aborted.
_COMMAND_BYTES = 64 << 10
_OTHER_DATASET_BYTES = 1 << 20
_FLOOD_LOG_SECONDS = 10
_RECEIVE_BYTES = 1 << 20  # at most this per recv() call
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_DEFER_PAUSE_SECONDS = 0.002  # between two looks while a connection waits for a peer
_COLLECT_SECONDS = 30.0  # between two full garbage collections of the accept loop


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
    first PDU (the A-ASSOCIATE-RQ) must be complete by ``deadline``. Reads up to
    ``_RECEIVE_BYTES`` a call (pynetdicom's own ``recv`` reads 4 KiB), and asks for quick
    acknowledgements before each PDU (``quick_ack``)."""

    def __init__(self, connection: AssociationSocket, limit: int, peer: str,
                 deadline: float) -> None:
        self.connection = connection
        self.limit = limit
        self.peer = peer
        self.deadline: float | None = deadline  # None once the first PDU is in
        self._header_next = True

    def __call__(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer if the peer closes); RefusedPduError for a header that
        must not be followed."""
        sock = cast(socket.socket, self.connection.socket)  # set: the DUL is reading
        if self._header_next:
            # The DUL reads once data is there: its ACK, delayed since our last answer,
            # leaves now, and so do those of the PDU's segments still to come.
            quick_ack(sock)
        data = (_receive_all(sock, nr_bytes) if self.deadline is None
                else self._by_deadline(sock, nr_bytes, self.deadline))
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

    def _by_deadline(self, sock: socket.socket, nr_bytes: int,
                     deadline: float) -> bytearray:
        """``nr_bytes`` (fewer if the peer closes); TimeoutError at ``deadline``, however
        slowly the peer trickles them."""
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


def _receive_all(sock: socket.socket, size: int) -> bytearray:
    """``size`` bytes, fewer if the peer closes first. Memory grows with what arrives, not
    with what the header announced."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), _RECEIVE_BYTES))
        if not chunk:
            break
        data += chunk
    return data


def low_latency(sock: socket.socket) -> None:
    """TCP_NODELAY on an accepted socket (each of our PDUs leaves in one send; none waits
    for an acknowledgement), and TCP_QUICKACK."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    quick_ack(sock)


def quick_ack(sock: socket.socket) -> None:
    """Acknowledge received segments at once rather than after Linux's delayed-ACK time.
    Not sticky: the kernel goes back to delaying once this side sends (it expects to carry
    the ACK on an answer), so it is set again before each PDU. Nothing where the option
    does not exist."""
    if _QUICKACK is not None:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


class ReceivedDataset:
    """A C-STORE data set written to a temporary blob as its fragments arrive, after the
    preamble and File Meta ``header``, up to ``limit`` bytes in all, each byte reserved in
    ``ingest`` (the ingest bytes in flight) before it is written. Past the limit, or on a
    write error, the file is deleted and the rest counted and dropped as it comes:
    ``refusal`` says why; past the ingest budget the same, ``over_budget`` says why. The
    reservation is given back once the file is deleted or, claimed, closed again after it
    was stored. The sink pynetdicom writes to (``pynetdicom_adapter``)."""

    def __init__(self, new_blob: Callable[[int], TemporaryBlob], header: bytes,
                 limit: int, ingest: ByteBudget) -> None:
        self.limit = limit
        self.size = 0
        self.refusal: IngestResult | None = None
        self.over_budget: OverBudget | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._blob: TemporaryBlob | None = None
        self._held = ingest.reserve(0, "this C-STORE data set")
        try:
            self._blob = new_blob(limit)
        except OSError as exc:
            self._refuse(io_failure(exc))
        self.name = str(self._blob.path) if self._blob else ""
        self.write(header)

    @property
    def file(self) -> "ReceivedDataset":
        """What pynetdicom flushes after each fragment."""
        return self

    @property
    def closed(self) -> bool:
        """True once claimed, closed or refused."""
        return self._closed

    def flush(self) -> None:
        """Nothing to do: fragments are written unbuffered."""

    def write(self, data: bytes) -> None:
        """Append one fragment, or count it only, once refused."""
        with self._lock:
            self.size += len(data)
            if self._closed or self._blob is None:
                return
            try:
                self._held.resize(self.size)
            except OverBudget as exc:  # logged and counted where refused
                self.over_budget = exc
                self._close()
                return
            try:
                self._blob.write(data)
            except BlobTooLargeError:
                self._refuse(too_large(self.limit))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    log.error("cannot write a received data set to %s: %s", self.name, exc)
                self._refuse(io_failure(exc))

    def claim(self) -> TemporaryBlob:
        """The complete file, now the caller's to store or discard."""
        with self._lock:
            if self._closed or self._blob is None:
                raise ValueError("the received data set is closed")
            self._closed = True
            return self._blob

    def close(self) -> None:
        """Close the file and delete it, unless claimed; once claimed, call it when the
        file is stored or deleted: its bytes are no longer in flight."""
        with self._lock:
            self._close()
            self._held.release()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._blob is not None:
                self._blob.discard()
            self._held.release()

    def _refuse(self, why: IngestResult) -> None:
        self.refusal = why
        self._close()


def received_dataset(event: evt.Event) -> ReceivedDataset:
    """The data set of the EVT_C_STORE ``event`` of a GuardedAssociationServer."""
    received = dataset_sink(event)
    if not isinstance(received, ReceivedDataset):
        raise TypeError("C-STORE data set not received by GuardedAssociationServer")
    return received


class GuardedRequestHandler(AdaptedRequestHandler):
    """Refuses a client over its connection limit; guards the association of the others."""

    server: "GuardedAssociationServer"
    _assoc: Association | None = None

    def handle(self) -> None:
        """Start the association, or answer A-ASSOCIATE-RJ if the client has too many."""
        server, host = self.server, self.client_address[0]
        if not server.clients.admit(host):
            # Its pending slot first: held while the rejection waits up to twice the ARTIM
            # time, it would let one address fill max_pending and deny everyone else.
            server.settle_unassociated()
            log.warning("association from %s refused: %d already open (limit per client)",
                        host, server.clients.limit)
            server.on_refused(host)
            if server.courtesy.acquire(blocking=False):
                try:
                    with contextlib.suppress(OSError):  # the peer left, silent, failed TLS
                        _reject(self.request, server.limits)
                finally:
                    server.courtesy.release()
            server.shutdown_request(self.request)
            return
        try:
            super().handle()
        except BaseException:
            if self._assoc is None:
                server.clients.release(host)
                server.settle_unassociated()
            else:
                server.release(self._assoc)
            raise

    def configure(self, assoc: Association) -> None:
        """Guard the PDUs of ``assoc``, stream its C-STORE data sets, track its slots."""
        server, host = self.server, self.client_address[0]
        limits = server.limits
        deadline = time.monotonic() + limits.artim_seconds
        connection = assoc.dul.socket
        guard_receive(assoc, PduGuard(connection, limits.max_pdu_bytes, host, deadline),
                      limits.artim_seconds)

        def open_dataset(sop_class: str, sop_instance: str,
                         transfer_syntax: str) -> ReceivedDataset:
            header = file_preamble_and_meta(sop_class, sop_instance, transfer_syntax,
                                            assoc.requestor.ae_title)
            return ReceivedDataset(server.new_blob, header, server.max_instance_bytes,
                                   server.ingest)

        use_dimse(assoc, StreamingDimse(assoc, open_dataset, _COMMAND_BYTES,
                                        _OTHER_DATASET_BYTES))
        wait_instead_of_polling(assoc)
        call_when_ended(assoc, server.association_ended)
        server.track(assoc, host)
        self._assoc = assoc


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


@dataclass(slots=True)
class _Connection:
    """The slots one connection holds."""

    host: str  # counted in ClientCounts
    pending: bool = True  # a max_pending slot: no A-ASSOCIATE-RQ yet
    served: bool = False  # a max_associations slot


class GuardedAssociationServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer with the limits above, made by ``AE.make_server``.
    ``on_refused(host)`` is called for each association refused over the per-client limit,
    ``on_flooded()`` for each connection closed over ``max_pending``; C-STORE data sets go
    to blobs from ``new_blob(limit)``, ``max_instance_bytes`` of each at most, within the
    ``ingest`` bytes in flight. ``slots`` and ``clients`` count what this server holds
    (of this process alone when not given), ``listener`` is the socket to accept on
    (bound here when not given)."""

    def __init__(self, *args: Any, limits: ConnectionLimits,
                 new_blob: Callable[[int], TemporaryBlob], max_instance_bytes: int,
                 ingest: ByteBudget, on_refused: Callable[[str], None],
                 on_flooded: Callable[[], None], slots: AssociationSlots | None = None,
                 clients: ClientCounts | None = None,
                 listener: socket.socket | None = None, **kwargs: Any) -> None:
        self.limits = limits
        self.clients = clients or ClientCounts(limits.per_client)
        self.slots = slots or AssociationSlots(limits.max_pending, limits.max_associations)
        self._listener = listener
        self._collected = time.monotonic()
        self.courtesy = threading.BoundedSemaphore(_COURTESY_REJECTIONS)
        self.new_blob = new_blob
        self.max_instance_bytes = max_instance_bytes
        self.ingest = ingest
        self.on_refused = on_refused
        self.on_flooded = on_flooded
        self._slots = threading.Lock()
        self._connections: dict[int, _Connection] = {}  # by id() of their association
        self._flood = 0  # connections closed over max_pending since the last log line
        self._flood_logged = 0.0
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)
        self.bind(evt.EVT_REQUESTED, self._on_requested)
        self.bind(evt.EVT_CONN_CLOSE, self._on_close)

    def server_bind(self) -> None:
        """Bind the listening socket, or take the one given."""
        if self._listener is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self._listener
        # Every receiver waits on it: one that loses the race for a connection must not
        # then block in accept() (its stop would wait for the next connection).
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listen, unless the socket given listens already."""
        if self._listener is None:
            super().server_activate()

    def server_close(self) -> None:
        """Close the listening socket: only this process's copy when it was given, whose
        shutdown() would stop every receiver accepting on it."""
        if self._listener is None:
            super().server_close()
        else:
            self.socket.close()

    def service_actions(self) -> None:
        """A full garbage collection every ``_COLLECT_SECONDS`` (pynetdicom collects ended
        associations' cycles every 60 turns of the accept loop: with several receivers each
        turns for every connection, and for each look while one waits, and a collection
        holds the interpreter for tens of milliseconds)."""
        now = time.monotonic()
        if now - self._collected >= _COLLECT_SECONDS:
            gc.collect()
            self._collected = now

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection, unless a less busy receiver should (BlockingIOError: the
        accept loop looks again); a TLS handshake is left to the association's thread."""
        if self.slots.should_defer():
            time.sleep(_DEFER_PAUSE_SECONDS)
            raise BlockingIOError("left to a less busy receiver for a moment")
        try:
            client, address = self.socket.accept()
        finally:  # taken, here or by another receiver
            self.slots.stop_waiting()
        with contextlib.suppress(OSError):  # reset already: its reads will tell
            low_latency(client)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Count the connection as pending, or close it (no thread) over max_pending."""
        with self._slots:
            if self.slots.pending.take():
                return True
            self._flood += 1
            now = time.monotonic()
            if now - self._flood_logged >= _FLOOD_LOG_SECONDS:
                # One line per period: a flood must not flood the log.
                log.warning("%d connection(s) closed at once, the last from %s: %d still "
                            "negotiating (max_pending_connections)", self._flood,
                            client_address[0], self.slots.pending.total())
                self._flood, self._flood_logged = 0, now
        self.on_flooded()
        return False

    def settle_unassociated(self) -> None:
        """A pending connection that will have no association (refused, or failed)."""
        self.slots.pending.give()

    def track(self, assoc: Association, host: str) -> None:
        """``assoc`` holds the pending slot and the client count of its connection."""
        with self._slots:
            self._connections[id(assoc)] = _Connection(host)

    def release(self, assoc: Association) -> bool:
        """Free the slots of ``assoc``'s connection; False if already free."""
        with self._slots:
            connection = self._connections.pop(id(assoc), None)
            if connection is None:
                return False
            self.slots.pending.give(connection.pending)
            self.slots.served.give(connection.served)
        self.clients.release(connection.host)
        return True

    def association_ended(self, assoc: Association) -> None:
        """The thread of ``assoc`` ended: its connection is closed, reported or not."""
        with self._slots:
            unreported = id(assoc) in self._connections
        if unreported:
            log.warning("the connection from %s ended without a close from pynetdicom",
                        assoc.requestor.address)
            announce_close(assoc, self)
        self.release(assoc)
        if isinstance(assoc.dimse, StreamingDimse):
            assoc.dimse.discard()  # data sets received and never handled

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._slots:
            connection = self._connections.get(id(assoc))
            # A connection already closed (released) gets no slot.
            admitted = connection is not None and self.slots.served.take()
            if connection is not None:
                self.slots.pending.give(connection.pending)
                connection.pending = False
                connection.served = admitted
        if admitted:
            return
        log.warning("association from %s refused: %d associations served (max_associations)",
                    assoc.requestor.address, self.limits.max_associations)
        reject_association(assoc)

    def _on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        self.release(assoc)  # its data sets are left to association_ended: a handler may run
        # Closed (AA-5) or timed out (AA-2) before any A-ASSOCIATE-RQ: the association
        # thread waits for one until acse_timeout.
        wake_if_negotiating(assoc)


def pdu_limit(max_pdu: int) -> int:
    """The longest PDU accepted: what we announce as Maximum Length (P-DATA-TF, PS3.8
    D.1), but at least 1 MiB for association PDUs; 64 MiB when the length is unlimited."""
    return max(max_pdu, 1 << 20) if max_pdu else 64 << 20
