"""The SCU towards PACS peers (PS3.4 Annex C): which studies a peer holds (C-FIND, Study Root),
which instances of one study (C-FIND at SERIES then IMAGE level), and retrieving a study
(C-MOVE to our own AE title, or C-GET).

Every call opens its own association, bounded by ``timeout`` for negotiation, each DIMSE
message and network silence, and by ``limit`` for the matches it reads.
"""

import datetime
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, Association, StoragePresentationContexts, build_role, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway import metrics
from gateway.dicom.peer import DicomPeer, Retrieve
from gateway.dicom.statuses import OUT_OF_RESOURCES, SUCCESS, failure_status
from gateway.logs import escape_controls
from storage.store import Store
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)
# The syntaxes a C-GET proposes for each storage SOP class, one presentation context each, so
# that the PACS sends every instance as it holds it (no transcoding on its side) whatever the
# syntax: a context with several would let it pick one and transcode the others.
_GET_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit,
                 JPEGExtended12Bit, JPEGLosslessSV1, JPEG2000Lossless, JPEG2000,
                 JPEGLSLossless, JPEGLSNearLossless, RLELossless,
                 DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1 to 255
# C-GET sub-operations refused past those listed, or C-MOVE / C-GET pending responses past
# those announced, before the retrieval is aborted.
_MAX_SURPLUS = 16
_MAX_COMMENT = 64  # characters of an Error Comment kept (its LO length)


class PacsError(Exception):
    """The peer could not be reached, refused the association, broke it off or answered
    with a failure status; the message says which, for an operator."""


@dataclass(frozen=True)
class StudyMatch:
    """One study a peer holds, as its STUDY-level C-FIND response describes it."""

    study_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str
    modalities: tuple[str, ...]
    instance_count: int | None


@dataclass(frozen=True)
class HeldInstance:
    """One instance a peer holds, from its IMAGE-level C-FIND response."""

    sop_uid: str
    series_uid: str
    sop_class_uid: str  # "" when the peer does not return it


@dataclass(frozen=True)
class RetrieveResult:
    """The final counts of a C-MOVE or C-GET (PS3.4 C.4.2.1.5, C.4.3.1.4)."""

    completed: int
    failed: int
    warning: int
    failed_uids: tuple[str, ...]


def _ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


@contextmanager
def _association(ae: AE, peer: DicomPeer, **kwargs: object) -> Iterator[Association]:
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, **kwargs)
    except OSError as exc:
        raise PacsError(f"{peer.ae_title} at {peer.host}:{peer.port} unreachable: {exc}") from exc
    if not assoc.is_established:
        how = ("rejected the association" if assoc.is_rejected
               else "could not be reached or did not answer")
        raise PacsError(f"{peer.ae_title} at {peer.host}:{peer.port} {how}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _find(assoc: Association, peer: DicomPeer, query: Dataset, limit: int) -> Iterator[Dataset]:
    """The matches of one C-FIND; PacsError on a failure status, a broken association or more
    than ``limit`` matches (the query is then cancelled)."""
    responses = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
    count = 0
    for status, identifier in responses:
        if not status:  # no response within the DIMSE timeout, or the association ended
            raise PacsError(f"{peer.ae_title} did not complete the C-FIND")
        code = int(status.Status)
        if code in PENDING:
            count += 1
            if count > limit:
                assoc.abort()
                raise PacsError(f"{peer.ae_title} has more than {limit} matches: narrow the query")
            if identifier is not None:
                yield identifier
        elif code != SUCCESS:
            comment = _comment(status)
            raise PacsError(f"{peer.ae_title} answered C-FIND with 0x{code:04X} {comment}".strip())


def _comment(status: Dataset) -> str:
    """The Error Comment of a status (LO, PS3.7 C.4), its control characters escaped: it is
    shown on a terminal, in a log line and an HTTP answer."""
    return escape_controls(str(status.get("ErrorComment", "") or "")[:_MAX_COMMENT])


def _text(identifier: Dataset, keyword: str) -> str:
    value = identifier.get(keyword)
    return "" if value is None else str(value)


def find_studies(peer: DicomPeer, calling_ae: str, *, study_uid: str | None = None,
                 accession: str | None = None, patient_id: str | None = None,
                 since: datetime.date | None = None, timeout: float = 60,
                 limit: int = 1000) -> list[StudyMatch]:
    """The studies ``peer`` holds matching every criterion given (Study Root, STUDY level;
    ``since`` is a Study Date range open at its end, PS3.4 C.2.2.2.5)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid or ""
    query.AccessionNumber = accession or ""
    query.PatientID = patient_id or ""
    query.StudyDate = f"{since:%Y%m%d}-" if since else ""
    query.PatientName = ""
    query.ModalitiesInStudy = ""
    query.NumberOfStudyRelatedInstances = ""
    with _association(_find_ae(calling_ae, timeout), peer) as assoc:
        matches = []
        for found in _find(assoc, peer, query, limit):
            count = found.get("NumberOfStudyRelatedInstances")
            modalities = found.get("ModalitiesInStudy") or []
            matches.append(StudyMatch(
                _text(found, "StudyInstanceUID"), _text(found, "PatientID"),
                _text(found, "PatientName"), _text(found, "AccessionNumber"),
                _text(found, "StudyDate"),
                tuple(modalities) if isinstance(modalities, list | tuple) else (str(modalities),),
                int(count) if count not in (None, "") else None))
    valid = []
    for match in matches:
        # The UID names files (the study's lock, its folder): never a path from a peer.
        if is_valid_uid(match.study_uid):
            valid.append(match)
        else:
            log.warning("C-FIND on %s: a match with an invalid Study Instance UID %r left"
                        " out", peer.ae_title, match.study_uid[:80])
    return valid


def _find_ae(calling_ae: str, timeout: float) -> AE:
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return ae


def held_instances(peer: DicomPeer, calling_ae: str, study_uid: str, *, timeout: float = 60,
                   limit: int = 100_000) -> list[HeldInstance]:
    """Every instance of ``study_uid`` that ``peer`` holds: a SERIES-level C-FIND, then an
    IMAGE-level one per series, since a hierarchical query names the unique key of every
    level above its own (PS3.4 C.4.1.2.2.1) and a strict peer refuses one that does not."""
    with _association(_find_ae(calling_ae, timeout), peer) as assoc:
        series_query = Dataset()
        series_query.QueryRetrieveLevel = "SERIES"
        series_query.StudyInstanceUID = study_uid
        series_query.SeriesInstanceUID = ""
        series_uids = [_text(found, "SeriesInstanceUID")
                       for found in _find(assoc, peer, series_query, limit)]
        held: list[HeldInstance] = []
        for series_uid in filter(None, series_uids):
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = series_uid
            query.SOPInstanceUID = ""
            query.SOPClassUID = ""
            for found in _find(assoc, peer, query, limit - len(held)):
                if sop_uid := _text(found, "SOPInstanceUID"):
                    held.append(HeldInstance(sop_uid, series_uid, _text(found, "SOPClassUID")))
    return held


def retrieve_study(peer: DicomPeer, calling_ae: str, study_uid: str, store: Store, *,
                   timeout: float = 60,
                   on_progress: Callable[[int, int], None] | None = None) -> RetrieveResult:
    """Have ``peer`` send every instance of ``study_uid`` into ``store``: by C-MOVE to
    ``calling_ae`` (the running service's C-STORE SCP stores each before answering, so they
    are indexed when this returns) or by C-GET on this association.
    ``on_progress(done, total)`` follows the peer's pending responses."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    if peer.retrieve is Retrieve.MOVE:
        ae = _ae(calling_ae, timeout)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        with _association(ae, peer) as assoc:
            responses = assoc.send_c_move(identifier, calling_ae,
                                          StudyRootQueryRetrieveInformationModelMove)
            try:
                return _retrieved(peer, "C-MOVE", responses, on_progress)
            except _RunawayError:
                assoc.abort()
                raise
    listed = held_instances(peer, calling_ae, study_uid, timeout=timeout)
    held = {item.sop_class_uid for item in listed}
    sop_classes = sorted(held - {""})
    if "" in held:  # a peer that does not return SOP Class UID (e.g. dcmqrscp)
        sop_classes += [context.abstract_syntax for context in StoragePresentationContexts
                        if context.abstract_syntax not in held]
    ae = _ae(calling_ae, timeout)
    ae.requested_contexts = _get_contexts(sop_classes)
    roles = [build_role(uid, scp_role=True) for uid in sop_classes]
    sub_operations = _GetSubOperations(store, peer, study_uid, len(listed))
    handlers = [(evt.EVT_C_STORE, sub_operations.on_store)]
    with _association(ae, peer, ext_neg=roles, evt_handlers=handlers) as assoc:
        responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        try:
            return _retrieved(peer, "C-GET", responses, on_progress, sub_operations.overflow)
        except _RunawayError:
            assoc.abort()
            raise


def _get_contexts(sop_classes: list[str]) -> list[PresentationContext]:
    """The C-GET context and, for each storage SOP class, one context per syntax; when that
    is more than a PS3.8 association can carry, one context per class with every syntax."""
    contexts = [(StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian,
                                                            ImplicitVRLittleEndian])]
    if 1 + len(sop_classes) * len(_GET_SYNTAXES) <= _MAX_CONTEXTS:
        contexts += [(uid, [syntax]) for uid in sop_classes for syntax in _GET_SYNTAXES]
    else:
        contexts += [(uid, list(_GET_SYNTAXES)) for uid in sop_classes[:_MAX_CONTEXTS - 1]]
    built = []
    for number, (abstract, syntaxes) in enumerate(contexts):
        context = PresentationContext()
        context.context_id = 2 * number + 1
        context.abstract_syntax = abstract
        context.transfer_syntax = syntaxes
        built.append(context)
    return built


class _GetSubOperations:
    """The C-STORE sub-operations of one C-GET (PS3.4 C.4.3.3), stored as encoded: each must
    be an instance of the study asked for (another study, another patient's maybe, is
    refused: A900), and there may be no more of them than the instances the peer's C-FIND
    listed: past them each is refused (A700) and the C-GET aborted at the peer's next
    response, or at once ``_MAX_SURPLUS`` sub-operations later (a peer sending without end
    would otherwise fill the disk or never finish)."""

    def __init__(self, store: Store, peer: DicomPeer, study_uid: str, listed: int) -> None:
        self.store = store
        self.peer = peer
        self.study_uid = study_uid
        self.listed = listed
        self.received = 0

    def overflow(self) -> str:
        """Why the C-GET must stop ("" while it may go on)."""
        if self.received <= self.listed:
            return ""
        return (f"{self.peer.ae_title} sent more instances than the {self.listed} it listed"
                f" for study {self.study_uid}: C-GET aborted")

    def on_store(self, event: evt.Event) -> int:
        """EVT_C_STORE: store one instance, or refuse it."""
        self.received += 1
        if self.received > self.listed:
            if self.received == self.listed + 1:
                log.warning("C-GET from %s: more instances than the %d it listed for study"
                            " %s", self.peer.ae_title, self.listed, self.study_uid)
            elif self.received > self.listed + _MAX_SURPLUS:
                event.assoc.abort(block=False)
            return OUT_OF_RESOURCES
        data = event.encoded_dataset()
        result = self.store.ingest(data, source=self.peer.ae_title, expected={
            "StudyInstanceUID": self.study_uid,
            "SOPInstanceUID": str(event.request.AffectedSOPInstanceUID),
            "SOPClassUID": str(event.request.AffectedSOPClassUID)})
        metrics.record_ingest(result, "dimse", len(data))
        if result.accepted:
            return SUCCESS
        log.warning("instance from %s by C-GET refused: %s", self.peer.ae_title,
                    result.message)
        return failure_status(result.reason)


class _RunawayError(PacsError):
    """A peer that would not end its C-MOVE or C-GET: the association is to be aborted."""


def _retrieved(peer: DicomPeer, service: str, responses: Iterator[tuple[Dataset, Dataset | None]],
               on_progress: Callable[[int, int], None] | None,
               stop: Callable[[], str] | None = None) -> RetrieveResult:
    """Read a C-MOVE or C-GET to its final response (PS3.4 Table C.4-2 / C.4-3).

    A pending response comes at most once per sub-operation (PS3.4 C.4.2.1.5, C.4.3.1.4:
    each carries the counts), so a peer sending more than the first one announced, or
    ``stop`` giving a reason, is a runaway (_RunawayError): a peer answering without end
    would hold the retrieval, and the study's lock, for ever."""
    pending, announced = 0, 0
    for status, identifier in responses:
        if stop is not None and (reason := stop()):
            raise _RunawayError(reason)
        if not status:
            raise PacsError(f"{peer.ae_title} did not complete the {service}")
        code = int(status.Status)
        counts = [int(status.get(f"NumberOf{kind}Suboperations", 0) or 0)
                  for kind in ("Completed", "Failed", "Warning", "Remaining")]
        if code in PENDING:
            pending += 1
            announced = announced or sum(counts)
            if pending > announced + _MAX_SURPLUS:
                raise _RunawayError(f"{peer.ae_title} sent {pending} pending {service}"
                                    f" responses for {announced} sub-operations: aborted")
            if on_progress is not None:
                done = sum(counts[:3])
                on_progress(done, done + counts[3])
            continue
        failed_uids: tuple[str, ...] = ()
        if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
            listed = identifier.FailedSOPInstanceUIDList
            failed_uids = tuple(listed) if isinstance(listed, list | tuple) else (str(listed),)
        if code == SUCCESS or code == 0xB000:  # B000: some sub-operations failed
            return RetrieveResult(counts[0], counts[1], counts[2], failed_uids)
        comment = _comment(status)
        raise PacsError(f"{peer.ae_title} answered {service} with 0x{code:04X} {comment}"
                        .strip() + (f" ({counts[0]} instances sent)" if counts[0] else ""))
    raise PacsError(f"{peer.ae_title} ended the {service} without a final response")
