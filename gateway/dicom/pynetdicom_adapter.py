"""Every use of pynetdicom's internals by this project, in one place.

pynetdicom has no public hook for what ``server`` needs (a C-STORE data set written to a file
of our own as it arrives, bounded; the DIMSE message being decoded bounded; an association's
end whatever ends it; its receive path guarded). This module does those through the internals
below, checked against pynetdicom 3.0.4 (pyproject.toml pins ``>=3.0.4,<3.1``); a new
pynetdicom release means reading each of them again:

- ``RequestHandler._create_association``: overridden by ``AdaptedRequestHandler`` to
  configure each association before its thread starts.
- ``Association.dimse``: replaced by ``StreamingDimse``, a ``DIMSEServiceProvider`` subclass
  whose ``receive_primitive`` feeds the base one a presentation data value at a time and
  reads ``DIMSEServiceProvider.message`` (the message being decoded),
  ``DIMSEMessage.encoded_command_set`` and ``.data_set`` (BytesIO), and sets
  ``C_STORE_RQ._data_set_file`` / ``._data_set_path``: the file pynetdicom's own
  STORE_RECV_CHUNKED_DATASET mode writes the data set to (``write``, ``file.flush()``); the
  C-STORE primitive carries it as ``_dataset_file`` and ``_dataset_path`` (the latter public
  as ``Event.dataset_path``), and ``StorageServiceClass.SCP`` calls its ``close()`` then
  ``os.unlink(name)`` after the EVT_C_STORE handler. That mode itself does not fit: its
  ``NamedTemporaryFile`` goes to the system temp dir, unbounded, with no way to refuse.
- ``Association._accepted_cx``: the transfer syntax of a presentation context id.
- ``DULServiceProvider.event_queue.put("Evt19")``: an A-ABORT as for an invalid PDU
  (PS3.8 9.2, action AA-8), what pynetdicom itself does for an undecodable DIMSE message.
- ``DULServiceProvider.to_user_queue.put(None)`` and ``.state_machine.current_state``: wake
  the association thread waiting acse_timeout for an A-ASSOCIATE-RQ (Sta2) once the
  connection has closed.
- ``DULServiceProvider.artim_timer.timeout``; ``AssociationSocket.recv``, replaced.
- ``ApplicationEntity._servers``: where ``AE.start_server`` registers a server, so that
  ``AE.shutdown`` stops it.
- ``events.trigger``: to emit EVT_REJECTED and EVT_CONN_CLOSE as pynetdicom's code does.
- ``DULServiceProvider._run_loop_delay``, ``._is_transport_event``, ``.event_queue`` and
  ``.to_provider_queue``, ``AssociationSocket.socket``: ``wait_instead_of_polling`` (below).
- ``Association._run_reactor`` calls ``dimse.get_msg(block=False)`` after a 1 ms sleep, in a
  loop: ``StreamingDimse.get_msg`` waits there instead.

Public API used as documented: ``AE.make_server(server_class=...)``, ``Association.kill``,
``Association.acse.send_reject``, ``Association.run`` (``threading.Thread.run``, wrapped).
"""

import contextlib
import logging
import os
import queue
import select
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationServer, RequestHandler

log = logging.getLogger(__name__)
# How long an association's threads wait for work before they look at their timers and
# flags (ARTIM, the idle timeout, a kill, a release): pynetdicom's own loops poll every
# millisecond, which costs 4 % of a core per idle association.
_IDLE_WAIT_SECONDS = 0.02


class DatasetSink(Protocol):
    """Where a C-STORE data set is written as it arrives: what pynetdicom calls on the file
    of its chunked mode (``write``, ``file.flush()``, ``close()``, ``name``)."""

    name: str

    @property
    def file(self) -> Any:
        """An object with ``flush()``."""

    @property
    def closed(self) -> bool:
        """True once closed (stored, refused or abandoned)."""

    def write(self, data: bytes) -> None:
        """Append one data set fragment."""

    def close(self) -> None:
        """Close; what was not taken over is deleted."""


# (SOP Class UID, SOP Instance UID, transfer syntax) -> the sink of that data set
OpenDataset = Callable[[str, str, str], DatasetSink]


class MessageRefusedError(ValueError):
    """A DIMSE message the association is aborted for."""


class StreamingDimse(DIMSEServiceProvider):
    """The DIMSE provider of an association: the data set of each C-STORE-RQ goes to the
    sink ``open_dataset`` makes, as its fragments arrive; the command set of every message
    is bounded by ``command_limit`` bytes and any other data set by ``other_limit``."""

    def __init__(self, assoc: Association, open_dataset: OpenDataset, command_limit: int,
                 other_limit: int) -> None:
        super().__init__(assoc)
        self._open_dataset = open_dataset
        self._command_limit = command_limit
        self._other_limit = other_limit
        self._sinks: list[DatasetSink] = []  # opened, not yet closed (in flight or queued)
        self._refused = False

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Decode one P-DATA a presentation data value at a time, so that a C-STORE's sink
        is open before its first data set fragment (PS3.8 E.2: the command comes first).
        A message refused, or any error decoding it, aborts the association."""
        if self._refused:
            return  # the association is being aborted
        try:
            for context_id, value in primitive.presentation_data_value_list:
                self._receive_value(context_id, value)
        except Exception as exc:  # pynetdicom's own decoding raises many types too
            self._abort(exc)

    def _receive_value(self, context_id: int, value: bytes) -> None:
        message = self.message
        if value[:1] and value[0] & 1 and message is not None \
                and type(message) is not DIMSEMessage:
            raise MessageRefusedError("a command fragment after the last one (PS3.8 E.2)")
        single = P_DATA()
        single.presentation_data_value_list = [[context_id, value]]
        super().receive_primitive(single)
        message = self.message  # None once complete: queued with its sink, or handled
        if message is None:
            return
        if message.encoded_command_set.tell() > self._command_limit:
            raise MessageRefusedError(f"a command set over {self._command_limit} bytes")
        if isinstance(message, C_STORE_RQ):
            if message._data_set_file is None:
                sink = self._open(message)
                message._data_set_file = sink  # type: ignore[assignment]
                message._data_set_path = Path(sink.name)
        elif message.data_set is not None and message.data_set.tell() > self._other_limit:
            raise MessageRefusedError(f"the data set of a {type(message).__name__} over "
                                      f"{self._other_limit} bytes")

    def get_msg(self, block: bool = False) -> tuple[Any, Any]:
        """The next decoded message: as pynetdicom's, except that a call that would not
        block waits up to _IDLE_WAIT_SECONDS for one (the association's reactor calls it
        in a loop, after a 1 ms sleep: it then wakes when a message comes, not 1000
        times a second)."""
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(timeout=_IDLE_WAIT_SECONDS)
        except queue.Empty:
            return None, None

    def _open(self, message: C_STORE_RQ) -> DatasetSink:
        command = message.command_set
        sop_class = command.get("AffectedSOPClassUID")
        sop_instance = command.get("AffectedSOPInstanceUID")
        if not sop_class or not sop_instance:  # PS3.7 9.3.1.1: both mandatory
            raise MessageRefusedError("a C-STORE-RQ without its Affected SOP Class or Instance "
                                      "UID")
        context = self.assoc._accepted_cx.get(message.context_id)  # type: ignore[arg-type]
        if context is None:
            raise MessageRefusedError(f"a C-STORE-RQ on presentation context "
                                      f"{message.context_id}, not accepted")
        self._sinks = [sink for sink in self._sinks if not sink.closed]
        sink = self._open_dataset(str(sop_class), str(sop_instance),
                                  str(context.transfer_syntax[0]))
        self._sinks.append(sink)
        return sink

    def _abort(self, why: Exception) -> None:
        log.warning("aborting the association with %s: %s", self.assoc.requestor.address,
                    why if isinstance(why, MessageRefusedError)
                    else f"undecodable DIMSE message ({type(why).__name__}: {why})")
        self._refused = True
        arriving = getattr(self.message, "_data_set_file", None)
        if arriving is not None:  # those received before may be handled still
            arriving.close()
        self.message = None
        self.dul.event_queue.put("Evt19")

    def discard(self) -> None:
        """Close every data set sink not yet closed: received and never handled (the
        association ended first), or still arriving. Only once no handler runs."""
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def dataset_sink(event: evt.Event) -> DatasetSink:
    """The sink the data set of an EVT_C_STORE request went to."""
    sink = event.request._dataset_file
    if sink is None:
        raise TypeError("C-STORE data set not received through StreamingDimse")
    return sink  # type: ignore[return-value]


class AdaptedRequestHandler(RequestHandler):
    """A RequestHandler that calls ``configure(assoc)`` on each association it makes,
    before the association's thread starts."""

    def configure(self, assoc: Association) -> None:
        """Override: set up ``assoc`` (its socket and DUL exist, its thread is not
        started)."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        self.configure(assoc)
        return assoc


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue whose every ``put`` (``put_nowait`` too) calls ``wake``."""

    def __init__(self, items: "queue.Queue[Any]", wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake
        while not items.empty():  # e.g. Evt5, put when the socket was made
            super().put(items.get_nowait())

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _Waker:
    """A pipe that ends a thread's wait in ``select``; opened and closed by that thread
    alone (no descriptor is left should it never start), and never written once closed
    (its descriptor number may then be another file's)."""

    def __init__(self) -> None:
        self.read_end = self._write_end = -1
        self._lock = threading.Lock()
        self._open = False

    def open(self) -> None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        with self._lock:
            self.read_end, self._write_end, self._open = read_end, write_end, True

    def wake(self) -> None:
        with self._lock:
            if self._open:
                with contextlib.suppress(BlockingIOError):  # full: woken already
                    os.write(self._write_end, b"!")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_end, 4096)

    def close(self) -> None:
        with self._lock:
            self._open = False
            os.close(self.read_end)
            os.close(self._write_end)


def wait_instead_of_polling(assoc: Association) -> None:
    """Make the DUL thread of ``assoc`` wait on its socket, and on a pipe written whenever
    an event or a primitive to send is queued, instead of sleeping 1 ms between polls."""
    dul = assoc.dul
    waker = _Waker()
    dul.event_queue = _WakingQueue(dul.event_queue, waker.wake)
    dul.to_provider_queue = _WakingQueue(dul.to_provider_queue, waker.wake)
    dul._run_loop_delay = 0
    is_transport_event, run = dul._is_transport_event, dul.run

    def wait_then_look() -> bool:
        connection = dul.socket.socket if dul.socket is not None else None
        if connection is not None and dul.event_queue.empty() \
                and dul.to_provider_queue.empty() \
                and not (isinstance(connection, ssl.SSLSocket) and connection.pending()):
            with contextlib.suppress(OSError, ValueError):  # closed: pynetdicom sees it
                select.select([connection, waker.read_end], [], [], _IDLE_WAIT_SECONDS)
            waker.drain()
        return is_transport_event()

    def run_then_close() -> None:
        waker.open()  # what was queued before is seen: the wait looks at the queues first
        try:
            run()
        finally:
            waker.close()

    dul._is_transport_event = wait_then_look  # type: ignore[method-assign]
    dul.run = run_then_close  # type: ignore[method-assign]


def use_dimse(assoc: Association, dimse: StreamingDimse) -> None:
    """Make ``dimse`` the DIMSE provider of ``assoc``."""
    assoc.dimse = dimse


def guard_receive(assoc: Association, receive: Callable[[int], bytearray],
                  artim_seconds: float) -> None:
    """Make ``receive`` the receive function of ``assoc``'s socket (``recv(nr_bytes)``: that
    many bytes, fewer when the peer closes), and ``artim_seconds`` its ARTIM time."""
    connection = assoc.dul.socket
    connection.recv = receive  # type: ignore[method-assign]
    assoc.dul.artim_timer.timeout = artim_seconds


def call_when_ended(assoc: Association, callback: Callable[[Association], None]) -> None:
    """Call ``callback(assoc)`` when ``assoc``'s thread ends, however it ends (pynetdicom
    emits no EVT_CONN_CLOSE when its reader thread dies of an error)."""
    run = assoc.run

    def run_then_callback() -> None:
        try:
            run()
        finally:
            callback(assoc)

    assoc.run = run_then_callback  # type: ignore[method-assign]


def announce_close(assoc: Association, server: AssociationServer) -> None:
    """Emit EVT_CONN_CLOSE for ``assoc`` as pynetdicom does when a connection closes, for
    a connection whose close pynetdicom did not report; close its socket if still open."""
    connection = assoc.dul.socket
    if connection is not None and connection.socket is not None:
        server.shutdown_request(connection.socket)
    evt.trigger(assoc, evt.EVT_CONN_CLOSE, {"address": assoc.requestor.address_info.as_tuple})


def wake_if_negotiating(assoc: Association) -> None:
    """After the connection of ``assoc`` closed before any A-ASSOCIATE-RQ (Sta2): end the
    wait of its thread for one now rather than at the end of acse_timeout."""
    if assoc.dul.state_machine.current_state == "Sta2":
        assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


def reject_association(assoc: Association) -> None:
    """From EVT_REQUESTED: A-ASSOCIATE-RJ, rejected-transient, service-provider
    (presentation), local-limit-exceeded (PS3.8 9.3.4), as pynetdicom's own rejections."""
    assoc.acse.send_reject(0x02, 0x03, 0x02)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()  # until the peer closes, or ARTIM


def register_server(ae: AE, server: AssociationServer) -> None:
    """Register ``server`` with ``ae`` as ``AE.start_server`` does (``AE.shutdown`` stops
    it)."""
    ae._servers.append(server)  # type: ignore[arg-type]
