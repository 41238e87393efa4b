"""C-GET and C-MOVE SCP (PS3.4 C.4.3, C.4.2), Patient Root and Study Root, from the index.

The identifier names the instances by their unique keys (PS3.4 C.4.2.1.4, C.4.3.1.3); each is
one C-STORE sub-operation, over the same association for C-GET (to the storage contexts the
SCU proposed with the SCP role, PS3.7 D.3.3.4), over a sub-association from our AE title to
a configured destination for C-MOVE. pynetdicom drives the exchange: the handlers yield the
destination (C-MOVE), the number of sub-operations, then a data set per sub-operation, and it
sends the pending responses, the final status (0000, B000 some failed, A702 all failed, FE00
cancelled; PS3.4 Tables C.4-2, C.4-3) and the Failed SOP Instance UID List (0008,0058).

An instance goes in its stored transfer syntax when the peer accepted it for its SOP class
(pynetdicom 3.0's sub-operations take a data set: the stored file is read and written again
in the same syntax, value for value); else in one the peer accepted that
gateway.imaging.transcode can produce; else it is a failed sub-operation. Every stored file
is read through ``instance_file``.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway import metrics
from gateway.dicom.peer import DicomPeer
from gateway.dicom.query import (
    GET_MODELS,
    LEVEL_NAMES,
    MOVE_MODELS,
    IdentifierError,
    Model,
    parse,
    status,
)
from gateway.dicom.statuses import (
    CANCEL,
    PENDING,
    UNABLE_TO_COUNT_MATCHES,
    UNABLE_TO_PROCESS,
)
from gateway.imaging.budget import OverBudget, Reservation, ResourceBudget
from gateway.imaging.transcode import choose_syntax, transcode_file
from gateway.security.audit import AuditEvent, AuditTrail, EventType, Outcome
from storage.index import StoredInstance
from storage.search import Level, Match, QueryError
from storage.store import Store

log = logging.getLogger(__name__)

MAX_SUBOPERATIONS = 0xFFFF  # the sub-operation counts are US (PS3.7 Table 9.3-5)
_MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)
_NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_PAGE = 500
_WARNINGS = (0xB000, 0xB006, 0xB007)  # C-STORE warnings (PS3.4 Table B.2-1): stored


def instance_file(store: Store, instance: StoredInstance) -> Path | None:
    """The stored file of an indexed instance, None when there is none to read. The one
    place C-GET and C-MOVE read stored files from."""
    path = store.blobs.absolute(instance.path)
    return path if path.is_file() else None


@dataclass
class _Tally:
    """The C-STORE sub-operations of one retrieve, per study: [stored, failed]; stored
    counts the peer's successes and warnings (its C-STORE-RSP, seen as it arrives)."""

    studies: dict[str, list[int]] = field(default_factory=dict)
    stored_responses: int = 0

    def on_message(self, event: evt.Event) -> None:
        """EVT_DIMSE_RECV: count a C-STORE-RSP that says stored."""
        message = event.message
        if isinstance(message, C_STORE_RSP):
            code = int(message.command_set.get("Status", 0xC000))
            if code == 0 or code in _WARNINGS:
                self.stored_responses += 1

    def add(self, study_uid: str, stored: bool) -> None:
        """One sub-operation's outcome."""
        counts = self.studies.setdefault(study_uid, [0, 0])
        counts[0 if stored else 1] += 1

    @property
    def failed(self) -> int:
        """Sub-operations failed so far."""
        return sum(failed for _, failed in self.studies.values())


@dataclass
class _Retrieve:
    """One C-GET or C-MOVE being answered."""

    event: evt.Event
    service: str  # get, move
    model: Model
    destination: str = ""  # the C-MOVE destination as audited
    tally: _Tally = field(default_factory=_Tally)
    result: str = "failed"
    storing: Association | None = None  # where the sub-operations go


@dataclass
class RetrieveService:
    """The EVT_C_GET and EVT_C_MOVE handlers: answer, audit (one Instances Transferred
    event per study), count."""

    store: Store
    audit: AuditTrail
    budget: ResourceBudget
    destinations: list[DicomPeer]
    max_pdu: int

    def on_get(self, event: evt.Event) -> Iterator[object]:
        """Yield the number of sub-operations, then (status, data set) for each."""
        retrieve = _Retrieve(event, "get", GET_MODELS[event.request.AffectedSOPClassUID])
        retrieve.storing = event.assoc
        event.assoc.bind(evt.EVT_DIMSE_RECV, retrieve.tally.on_message)
        try:
            yield from self._answer(retrieve, self._instances(retrieve))
        finally:
            event.assoc.unbind(evt.EVT_DIMSE_RECV, retrieve.tally.on_message)
            self._record(retrieve)

    def on_move(self, event: evt.Event) -> Iterator[object]:
        """Yield the destination's address (None, None when unknown: A801), the number of
        sub-operations, then (status, data set) for each."""
        retrieve = _Retrieve(event, "move", MOVE_MODELS[event.request.AffectedSOPClassUID])
        name = str(event.request.MoveDestination or "").strip()
        retrieve.destination = name
        try:
            peer = next((p for p in self.destinations if p.ae_title == name), None)
            if peer is None:
                retrieve.result = "refused"
                log.warning("C-MOVE from %s refused: destination %r is not one of"
                            " move_destinations", event.assoc.requestor.ae_title, name)
                yield None, None
                return
            retrieve.destination = f"{peer.ae_title}@{peer.host}:{peer.port}"
            instances = self._instances(retrieve)

            def storing(accepted: evt.Event) -> None:
                retrieve.storing = accepted.assoc

            handlers = [(evt.EVT_ACCEPTED, storing),
                        (evt.EVT_DIMSE_RECV, retrieve.tally.on_message)]
            # A refusal is sent once pynetdicom has associated (its order): with Verification.
            contexts = (_contexts(instances) if isinstance(instances, list)
                        else [build_context(Verification)])
            yield peer.host, peer.port, {"contexts": contexts, "max_pdu": self.max_pdu,
                                         "evt_handlers": handlers}
            yield from self._answer(retrieve, instances)
        finally:
            self._record(retrieve)

    def _instances(self, retrieve: _Retrieve) -> list[StoredInstance] | Dataset:
        """The instances the identifier names, in series and instance order, or the
        failure status to answer with."""
        event = retrieve.event
        try:
            query = parse(event.identifier, retrieve.model, retrieve=True)
            found = _matching(self.store, query.matches)
        except IdentifierError as exc:
            retrieve.result = "refused"
            self._log_refusal(retrieve, exc.status, exc.message)
            return status(exc.status, exc.message, exc.offending)
        except QueryError as exc:
            retrieve.result = "refused"
            self._log_refusal(retrieve, UNABLE_TO_PROCESS, str(exc))
            return status(UNABLE_TO_PROCESS, str(exc))
        except _TooManyError:
            retrieve.result = "refused"
            message = f"more than {MAX_SUBOPERATIONS} instances: retrieve fewer at a time"
            self._log_refusal(retrieve, UNABLE_TO_COUNT_MATCHES, message)
            return status(UNABLE_TO_COUNT_MATCHES, message)
        except Exception as exc:  # the index failed, or an identifier pydicom cannot read
            log.exception("C-%s from %s failed", retrieve.service.upper(),
                          event.assoc.requestor.ae_title)
            return status(UNABLE_TO_PROCESS, f"unable to process: {type(exc).__name__}")
        log.info("C-%s from %s: %d instances at the %s level%s", retrieve.service.upper(),
                 event.assoc.requestor.ae_title, len(found), LEVEL_NAMES[query.level],
                 f" to {retrieve.destination}" if retrieve.destination else "")
        return found

    def _log_refusal(self, retrieve: _Retrieve, code: int, message: str) -> None:
        log.warning("C-%s from %s refused (0x%04X): %s", retrieve.service.upper(),
                    retrieve.event.assoc.requestor.ae_title, code, message)

    def _answer(self, retrieve: _Retrieve, instances: list[StoredInstance] | Dataset
                ) -> Iterator[object]:
        """The number of sub-operations, then a data set for each, or the failure."""
        if isinstance(instances, Dataset):
            yield 1  # pynetdicom then takes the failure as the final response
            yield instances, None
            return
        if not instances:
            retrieve.result = "success"  # pynetdicom answers at once: nothing resumes here
        yield len(instances)
        for instance in instances:
            if retrieve.event.is_cancelled:
                retrieve.result = "cancel"
                yield CANCEL, None
                return
            yield from self._send(retrieve, instance)
        retrieve.result = "success" if not retrieve.tally.failed else (
            "partial" if retrieve.tally.failed < len(instances) else "failed")

    def _send(self, retrieve: _Retrieve, instance: StoredInstance) -> Iterator[object]:
        """One sub-operation: the data set to send, or one that cannot be (no file meta:
        pynetdicom counts it failed and lists its SOP Instance UID)."""
        accepted = _accepted(retrieve.storing, instance.sop_class_uid)
        held: Reservation | None = None
        ds, transcoded = None, False
        try:
            ds, held, transcoded = self._dataset(instance, accepted)
        except OverBudget as exc:
            log.warning("C-%s: %s not sent: %s", retrieve.service.upper(), instance.sop_uid,
                        exc.message)
        except Exception:  # an unreadable file, a transcoder error
            log.exception("C-%s: %s not sent", retrieve.service.upper(), instance.sop_uid)
        try:
            before = retrieve.tally.stored_responses
            if ds is None:
                unsendable = Dataset()
                unsendable.SOPClassUID = instance.sop_class_uid
                unsendable.SOPInstanceUID = instance.sop_uid
                yield PENDING, unsendable
            else:
                yield PENDING, ds
            stored = retrieve.tally.stored_responses > before
            retrieve.tally.add(instance.study_uid, stored)
            result = ("transcoded" if transcoded else "sent") if stored else "failed"
            metrics.DIMSE_RETRIEVED_INSTANCES.labels(retrieve.service, result).inc()
        finally:
            if held is not None:
                held.release()

    def _dataset(self, instance: StoredInstance, accepted: list[str]
                 ) -> tuple[Dataset | None, Reservation | None, bool]:
        """The data set of ``instance`` in a syntax the peer accepted (None when there is
        none, or no file), the memory it holds, and whether it was transcoded."""
        path = instance_file(self.store, instance)
        if path is None:
            log.warning("no stored file for %s", instance.sop_uid)
            return None, None, False
        target = choose_syntax(instance.transfer_syntax, True, accepted)
        if target is None:
            log.warning("%s not sent: stored as %s, the peer accepts %s for its SOP class",
                        instance.sop_uid, instance.transfer_syntax,
                        ", ".join(accepted) or "nothing")
            return None, None, False
        if target == instance.transfer_syntax:
            # The file's bytes, and the data set encoded again from them.
            held = self.budget.memory.reserve(2 * self.budget.whole_read_bytes(path),
                                              "sending this instance")
            try:
                return dcmread(path), held, False
            except BaseException:
                held.release()
                raise
        data, held = transcode_file(path, target, self.budget)
        try:
            return dcmread(BytesIO(data)), held, True
        except BaseException:
            held.release()
            raise

    def _record(self, retrieve: _Retrieve) -> None:
        """Metrics, and one audit event per study retrieved (one without a study when none
        was)."""
        event, service = retrieve.event, retrieve.service
        metrics.DIMSE_RETRIEVES.labels(service, retrieve.result).inc()
        requestor = event.assoc.requestor
        to = f" to {retrieve.destination}" if retrieve.destination else ""
        outcome = Outcome.SUCCESS if retrieve.result in ("success", "cancel") else (
            Outcome.MINOR_FAILURE if retrieve.result in ("partial", "refused")
            else Outcome.SERIOUS_FAILURE)
        studies = retrieve.tally.studies or {"": [0, 0]}
        for study_uid, (stored, failed) in studies.items():
            self.audit.record(AuditEvent(
                EventType.INSTANCES_TRANSFERRED, "R", outcome, requestor.ae_title,
                requestor.address, study_uid,
                detail=f"C-{service.upper()}{to}: {stored} sent, {failed} failed;"
                       f" {retrieve.result}"))


class _TooManyError(Exception):
    """More instances than one retrieve can count."""


def _matching(store: Store, matches: list[Match]) -> list[StoredInstance]:
    """The indexed instances the unique keys ``matches`` name, a page of the index at a
    time, at most MAX_SUBOPERATIONS (_TooManyError past them)."""
    found: list[StoredInstance] = []
    offset = 0
    while True:
        page = store.index.search(Level.INSTANCE, matches, ["SOPInstanceUID"], False, _PAGE,
                                  offset)
        for row in page:
            instance = store.index.find_instance(str(row["SOPInstanceUID"]))
            if instance is not None:  # else removed since it matched
                found.append(instance)
        if len(found) > MAX_SUBOPERATIONS:
            raise _TooManyError
        if len(page) < _PAGE:
            return found
        offset += len(page)


def _contexts(instances: list[StoredInstance]) -> list[PresentationContext]:
    """The storage contexts a C-MOVE sub-association proposes: each SOP class in each of
    its stored syntaxes (as stored, when the destination accepts it), and with the native
    syntaxes when none of those is one (to send a transcoded copy); at most
    _MAX_CONTEXTS."""
    syntaxes: dict[str, list[str]] = {}
    for instance in instances:
        stored = syntaxes.setdefault(instance.sop_class_uid, [])
        if instance.transfer_syntax not in stored:
            stored.append(instance.transfer_syntax)
    contexts = [build_context(sop_class, [syntax])
                for sop_class, stored in syntaxes.items() for syntax in stored]
    contexts += [build_context(sop_class, list(_NATIVE))
                 for sop_class, stored in syntaxes.items() if not set(stored) & set(_NATIVE)]
    if len(contexts) > _MAX_CONTEXTS:
        log.warning("C-MOVE: %d presentation contexts needed, %d proposed", len(contexts),
                    _MAX_CONTEXTS)
    return contexts[:_MAX_CONTEXTS]


def _accepted(assoc: Association | None, sop_class: str) -> list[str]:
    """The transfer syntaxes ``assoc`` accepted for storing ``sop_class`` as SCU."""
    if assoc is None:
        return []
    return [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.as_scu]
