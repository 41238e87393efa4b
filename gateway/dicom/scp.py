"""DICOM upper-layer service: C-ECHO, C-STORE, C-FIND, C-GET and C-MOVE SCP (PS3.4 Annexes
A, B and C, PS3.7 9.1); the query/retrieve services are in ``query`` and ``retrieve``.

Received data sets are stored exactly as encoded by the peer (no transcoding), through
``storage.Store``: each is written to a temporary file as it arrives (``server``), which
becomes the stored file. The C-STORE response is sent only once the file and its index row
are on stable storage.
"""

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID_dictionary,
)
from pynetdicom import (
    AE,
    DEFAULT_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    Association,
    evt,
    sop_class,
)
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from gateway import metrics
from gateway.config import DicomSettings
from gateway.dicom.peer import DicomPeer
from gateway.dicom.pynetdicom_adapter import register_server
from gateway.dicom.query import FIND_MODELS, GET_MODELS, MOVE_MODELS, FindService
from gateway.dicom.retrieve import RetrieveService
from gateway.dicom.server import (
    ConnectionLimits,
    GuardedAssociationServer,
    pdu_limit,
    received_dataset,
)
from gateway.dicom.slots import AssociationSlots
from gateway.dicom.statuses import OUT_OF_RESOURCES, SUCCESS, failure_status
from gateway.imaging.budget import ResourceBudget
from gateway.pacs.restore import Restorer
from gateway.security.audit import AuditEvent, AuditTrail, EventType
from gateway.security.audit import Outcome as AuditOutcome
from gateway.security.client_counts import ClientCounts
from storage.store import Outcome, Store

log = logging.getLogger(__name__)


def _status(code: int, comment: str = "", offending: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if offending:  # Offending Element (0000,0901): the attribute the failure is about
        status.OffendingElement = [tag_for_keyword(offending)]
    if comment:
        # ErrorComment is LO: 64 characters at most (PS3.7 C.4).
        status.ErrorComment = comment[:64]
    return status


def storage_sop_classes() -> list[str]:
    """Every storage SOP class: pynetdicom's, and the retired or newer ones that pydicom's
    PS3.6 dictionary knows (archives still hold retired Ultrasound and NM objects)."""
    known = [context.abstract_syntax for context in AllStoragePresentationContexts]
    others = [(uid, keyword) for uid, (name, kind, _, _, keyword) in UID_dictionary.items()
              if kind == "SOP Class" and "Storage" in name and uid not in known and keyword
              and not any(word in name for word in ("Commitment", "Directory", "Print"))]
    for uid, keyword in others:
        if not hasattr(sop_class, keyword):
            sop_class.register_uid(uid, keyword, StorageServiceClass)
    return known + [uid for uid, _ in others]


class DicomService:
    """The DICOM SCP, run in background threads. One of several receiver
    processes accepting on one ``listener`` counts its ``slots`` and ``clients`` with the
    others (GuardedAssociationServer); alone, it binds its own."""

    def __init__(self, settings: DicomSettings, store: Store, audit: AuditTrail,
                 budget: ResourceBudget, ssl_context: ssl.SSLContext | None = None,
                 listener: socket.socket | None = None,
                 slots: AssociationSlots | None = None,
                 clients: ClientCounts | None = None,
                 move_destinations: Sequence[DicomPeer] = (),
                 restorer: Restorer | None = None) -> None:
        self.settings = settings
        self._shared = {"listener": listener, "slots": slots, "clients": clients}
        self.store = store
        self.audit = audit
        self.ingest = budget.ingest  # bytes in flight, shared with STOW-RS
        # Per association: study UID -> [instances stored, instances refused], audited when
        # the association ends (one event per study, not per instance).
        self._received: dict[int, dict[str, list[int]]] = {}
        self._received_lock = threading.Lock()
        self.ssl_context = ssl_context  # DICOM over TLS (PS3.15 B.1) when set
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_pdu_size = settings.max_pdu
        # pynetdicom counts the thread of every connection, negotiating or not, against this;
        # GuardedAssociationServer counts served associations against max_associations.
        self.ae.maximum_associations = settings.max_associations + settings.max_pending_connections
        self.ae.acse_timeout = settings.acse_timeout
        self.ae.dimse_timeout = settings.dimse_timeout
        self.ae.network_timeout = settings.network_timeout
        self.ae.require_calling_aet = list(settings.allowed_calling_aets)
        self.ae.add_supported_context(Verification, AllTransferSyntaxes)
        # Both roles: a C-GET SCU proposes to be the storage SCP (PS3.4 C.4.3, PS3.7 D.3.3.4).
        # pynetdicom accepts the first of these a context proposes: Explicit VR first and
        # Implicit VR last, so that neither a C-STORE sender nor a C-GET is made to drop the
        # value representations when it offered them.
        preferred = [ExplicitVRLittleEndian,
                     *(uid for uid in AllTransferSyntaxes
                       if uid not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
                     ImplicitVRLittleEndian]
        for uid in storage_sop_classes():
            self.ae.add_supported_context(uid, preferred, scu_role=True, scp_role=True)
        if settings.serves_query_retrieve:
            for uid in [*FIND_MODELS, *GET_MODELS, *MOVE_MODELS]:
                self.ae.add_supported_context(uid, DEFAULT_TRANSFER_SYNTAXES)
        finder = FindService(store.index, audit, settings.ae_title, settings.max_find_matches)
        retriever = RetrieveService(store, audit, budget, list(move_destinations),
                                    settings.max_pdu, restorer)
        self._server: ThreadedAssociationServer | None = None
        self._acceptor: threading.Thread | None = None
        self._handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, finder.on_find),
            (evt.EVT_C_GET, retriever.on_get),
            (evt.EVT_C_MOVE, retriever.on_move),
            (evt.EVT_CONN_OPEN, self._on_connection, [1]),
            (evt.EVT_CONN_CLOSE, self._on_connection, [-1]),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
        ]

    @property
    def port(self) -> int:
        """The port actually listened on (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("DICOM service not started")
        return self._server.server_address[1]

    def start(self) -> None:
        """Bind and start accepting associations in a background thread."""
        settings = self.settings
        address = (settings.host, settings.port)
        self._server = self.ae.make_server(
            address, evt_handlers=self._handlers, ssl_context=self.ssl_context,
            server_class=GuardedAssociationServer,
            limits=ConnectionLimits(
                settings.max_associations_per_client, settings.max_associations,
                settings.max_pending_connections, settings.artim_timeout,
                pdu_limit(settings.max_pdu)),
            new_blob=self.store.blobs.temporary,
            max_instance_bytes=self.store.limits.max_instance_bytes, ingest=self.ingest,
            on_refused=self._on_over_limit, on_flooded=self._on_flooded, **self._shared)
        self._acceptor = threading.Thread(target=self._server.serve_forever,
                                          name="dicom-acceptor", daemon=True)
        self._acceptor.start()
        register_server(self.ae, self._server)
        if not settings.serves_query_retrieve:
            log.warning("query/retrieve (C-FIND, C-GET, C-MOVE) not offered: dicom_host %s is"
                        " not loopback, and neither allowed_calling_aets nor dicom_tls is set",
                        settings.host)
        log.info("DICOM SCP %s listening on %s:%d%s", self.settings.ae_title, address[0],
                 self.port, " (TLS)" if self.ssl_context else "")

    def is_serving(self) -> bool:
        """True while the listening socket is open and its accept thread alive."""
        return bool(self._server and self._acceptor and self._acceptor.is_alive()
                    and self._server.socket.fileno() != -1)

    def stop(self) -> None:
        """Stop accepting, let established associations finish within the grace period,
        abort the rest. Every acknowledged instance is already durable; an aborted one was
        never acknowledged and left no file (writes are atomic). A connection still
        negotiating (no A-ASSOCIATE-AC yet: silent, or its TLS handshake failed) has nothing
        to finish and is aborted at once."""
        if self._server is None:
            return
        self._server.shutdown()
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        while (any(assoc.is_established for assoc in self.ae.active_associations)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            log.warning("aborting %s association with %s (%s) at shutdown",
                        "an established" if assoc.is_established else "a negotiating",
                        assoc.requestor.ae_title or "no AE title yet",
                        assoc.requestor.address)
            assoc.abort()
        self._server = None

    def _on_store(self, event: evt.Event) -> Dataset:
        calling = event.assoc.requestor.ae_title
        request = event.request
        received = received_dataset(event)
        # Refused while arriving (too large, disk full, over the ingest budget): its rest was
        # read and dropped, since the C-STORE indication comes with the last fragment only
        # (PS3.8 E.2), and the response after it; the association goes on.
        if received.over_budget is not None:
            self._count(event.assoc, "", False)
            log.warning("C-STORE from %s refused (0x%04X %s): %s", calling, OUT_OF_RESOURCES,
                        received.over_budget.reason, received.over_budget.message)
            # Out of Resources (PS3.4 Table B.2-1): the sender may try again later.
            return _status(OUT_OF_RESOURCES, received.over_budget.message)
        try:
            result = received.refusal or self.store.ingest_file(
                received.claim(), source=calling, expected={
                    "SOPInstanceUID": str(request.AffectedSOPInstanceUID),
                    "SOPClassUID": str(request.AffectedSOPClassUID)})
        finally:
            received.close()  # stored or deleted: out of the ingest bytes in flight
        metrics.record_ingest(result, "dimse", received.size)
        self._count(event.assoc, result.record.study_uid if result.record else "",
                    result.accepted)
        if result.accepted:
            if result.outcome is Outcome.CONFLICT:
                log.warning("conflict from %s on %s: %s", calling,
                            request.AffectedSOPInstanceUID, result.message)
            return _status(SUCCESS)
        code = failure_status(result.reason)
        log.warning("C-STORE from %s refused (0x%04X %s): %s", calling, code,
                    result.reason, result.message)
        return _status(code, result.message, result.offending)

    def _on_connection(self, event: evt.Event, change: int) -> None:
        # Counted on the TCP connection, which opens and closes exactly once whatever the
        # association does (rejected, aborted during negotiation, released).
        metrics.ASSOCIATIONS_OPEN.inc(change)
        if change < 0:  # after a release or abort this finds nothing left to audit
            self._audit_received(event.assoc, "connection lost")

    def _on_accepted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.info("association accepted from %s (%s:%s)", requestor.ae_title,
                 requestor.address, requestor.port)

    def _on_rejected(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS.labels("rejected").inc()
        requestor = event.assoc.requestor
        log.warning("association rejected from %s (%s:%s)", requestor.ae_title,
                    requestor.address, requestor.port)
        self.audit.record(AuditEvent(EventType.USER_AUTHENTICATION, "E",
                                     AuditOutcome.MINOR_FAILURE, requestor.ae_title,
                                     requestor.address, detail="association rejected"))

    def _on_over_limit(self, host: str) -> None:
        metrics.ASSOCIATIONS.labels("refused-over-limit").inc()
        self.audit.record(AuditEvent(EventType.USER_AUTHENTICATION, "E",
                                     AuditOutcome.MINOR_FAILURE, "", host,
                                     detail="association refused: too many from this client"))

    def _on_flooded(self) -> None:
        # Not audited: a flood of connections must not flush the audit trail.
        metrics.ASSOCIATIONS.labels("refused-over-limit").inc()

    def _count(self, assoc: Association, study_uid: str, accepted: bool) -> None:
        with self._received_lock:
            counts = self._received.setdefault(id(assoc), {}).setdefault(study_uid, [0, 0])
            counts[0 if accepted else 1] += 1

    def _on_ended(self, event: evt.Event, outcome: str) -> None:
        metrics.ASSOCIATIONS.labels(outcome).inc()
        log.info("association with %s %s", event.assoc.requestor.ae_title, outcome)
        self._audit_received(event.assoc, f"association {outcome}")

    def _audit_received(self, assoc: Association, how: str) -> None:
        """One ingest event per study received over the association."""
        with self._received_lock:
            received = self._received.pop(id(assoc), {})
        requestor = assoc.requestor
        for study_uid, (stored, refused) in received.items():
            self.audit.record(AuditEvent(
                EventType.INSTANCES_TRANSFERRED, "C",
                AuditOutcome.SUCCESS if not refused else AuditOutcome.MINOR_FAILURE,
                requestor.ae_title, requestor.address, study_uid,
                detail=f"{stored} stored, {refused} refused; {how}"))
