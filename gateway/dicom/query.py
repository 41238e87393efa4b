"""C-FIND SCP answered from the index (PS3.4 C.4.1), Patient Root and Study Root
information models (PS3.4 C.6.1, C.6.2), through the engine QIDO-RS uses (storage.search).

Hierarchical search only (PS3.4 C.4.1.3.1; relational queries are not negotiated): above the
query level, the identifier holds the unique key of each level, with a single value, and no
other key with a value; at the query level, any key the index holds is matched (single
value, wild card, list of UIDs, date and time ranges, universal matching: PS3.4 C.2.2.2); a
key it does not hold is returned empty, and when it had a value the matches come with status
FF01 (optional keys not supported, PS3.4 Table C.4-1). A response holds the keys asked for,
the Query/Retrieve Level and, when a value needs it, the Specific Character Set (UTF-8).
"""

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway import metrics
from gateway.dicom.statuses import (
    CANCEL,
    IDENTIFIER_MISMATCH,
    PENDING,
    PENDING_UNSUPPORTED_KEYS,
    TOO_MANY_MATCHES,
    UNABLE_TO_PROCESS,
)
from gateway.security.audit import AuditEvent, AuditTrail, EventType, Outcome
from storage.index import Index
from storage.search import ATTRIBUTES, Level, Match, QueryError

log = logging.getLogger(__name__)


class Model(enum.StrEnum):
    """A Query/Retrieve information model (PS3.4 C.6)."""

    PATIENT_ROOT = "patient-root"
    STUDY_ROOT = "study-root"


# The SOP classes of each model, by DIMSE service (PS3.4 C.6.1.1, C.6.2.1).
FIND_MODELS = {PatientRootQueryRetrieveInformationModelFind: Model.PATIENT_ROOT,
               StudyRootQueryRetrieveInformationModelFind: Model.STUDY_ROOT}
GET_MODELS = {PatientRootQueryRetrieveInformationModelGet: Model.PATIENT_ROOT,
              StudyRootQueryRetrieveInformationModelGet: Model.STUDY_ROOT}
MOVE_MODELS = {PatientRootQueryRetrieveInformationModelMove: Model.PATIENT_ROOT,
               StudyRootQueryRetrieveInformationModelMove: Model.STUDY_ROOT}

# Query/Retrieve Level (0008,0052) values (PS3.4 Tables C.6-1, C.6.2-1).
LEVEL_NAMES = {Level.PATIENT: "PATIENT", Level.STUDY: "STUDY", Level.SERIES: "SERIES",
               Level.INSTANCE: "IMAGE"}
_LEVELS = {name: level for level, name in LEVEL_NAMES.items()}
UNIQUE_KEYS = {Level.PATIENT: "PatientID", Level.STUDY: "StudyInstanceUID",
               Level.SERIES: "SeriesInstanceUID", Level.INSTANCE: "SOPInstanceUID"}
# Returned, never matched, beyond those the index computes (storage.search): counted per
# patient (PS3.4 Tables C.6-1, C.6-5), and where the instances are retrieved from.
_PATIENT_COUNTS = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                   "NumberOfPatientRelatedInstances")
_RETRIEVE_AE = "RetrieveAETitle"
_RETURNED_ONLY = frozenset({"NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                            "NumberOfSeriesRelatedInstances", "InstanceAvailability",
                            "TimezoneOffsetFromUTC", "PerformedProcedureStepStartDate",
                            "PerformedProcedureStepStartTime", "RequestAttributesSequence",
                            *_PATIENT_COUNTS, _RETRIEVE_AE})
# Keys of whichever level is queried (PS3.4 Tables C.6-2 to C.6-7, C.4.1.1.3.2).
_EVERY_LEVEL = frozenset({"InstanceAvailability", "TimezoneOffsetFromUTC", _RETRIEVE_AE})
_IDENTITY = ("PatientID", "IssuerOfPatientID")  # who a patient is (storage.index)
_PAGE = 100  # rows read from the index at a time
_UTF8 = "ISO_IR 192"
_AUDITED_QUERY_CHARS = 4096


class IdentifierError(ValueError):
    """An identifier the request cannot be answered for: its status, ErrorComment and the
    Offending Element's keyword."""

    def __init__(self, status: int, message: str, offending: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.offending = offending


@dataclass
class Query:
    """A C-FIND, C-GET or C-MOVE identifier, parsed: the level, the matches, the keys to
    return (those the index answers, and those returned empty)."""

    model: Model
    level: Level
    matches: list[Match] = field(default_factory=list)
    returned: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    unsupported_values: bool = False  # a key not matched on had a value: status FF01
    text: str = ""  # what was asked, for the audit trail

    @property
    def study_uid(self) -> str:
        """The one study the query names, if it names one."""
        uids = [m.value for m in self.matches if m.keyword == "StudyInstanceUID"]
        return uids[0] if len(uids) == 1 and "\\" not in uids[0] else ""


def status(code: int, comment: str = "", offending: str = "") -> Dataset:
    """A status data set: Status, and Error Comment (LO: 64 characters at most, PS3.7 C.4)
    and Offending Element when given."""
    result = Dataset()
    result.Status = code
    if offending and (tag := tag_for_keyword(offending)) is not None:
        result.OffendingElement = [tag]
    if comment:
        result.ErrorComment = comment[:64]
    return result


def key_level(keyword: str, model: Model) -> Level:
    """The level of a key the index holds, in ``model``: the patient's attributes are
    study-level keys of the Study Root model (PS3.4 Table C.6-5)."""
    level = Level.PATIENT if keyword in _PATIENT_COUNTS else ATTRIBUTES[keyword].level
    return Level.STUDY if model is Model.STUDY_ROOT and level is Level.PATIENT else level


def _text(element: DataElement) -> tuple[str, bool]:
    """A key's value as the index matches it (values joined by backslashes; "" for
    universal matching, which a lone ``*`` also is: PS3.4 C.2.2.2.4), and whether a
    sequence key had a value in its item."""
    if element.VR == "SQ":
        return "", any(inner.value not in (None, "", [])
                       for item in element.value for inner in item)
    value = element.value
    if value is None or value == "":
        return "", False
    if isinstance(value, MultiValue):
        text = "\\".join(str(v) for v in value)
    elif isinstance(value, bytes):
        text = value.decode("ascii", "replace")
    else:
        text = str(value)
    text = text.strip(" ")
    return ("" if text == "*" else text), False


def parse(identifier: Dataset, model: Model, retrieve: bool = False) -> Query:
    """The query of an identifier (PS3.4 C.4.1.2.1, hierarchical); IdentifierError for one
    the model does not allow. ``retrieve``: a C-GET or C-MOVE identifier, whose keys are
    the unique keys only (PS3.4 C.4.2.1.4, C.4.3.1.3)."""
    name = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
    level = _LEVELS.get(name)
    if level is None or (model is Model.STUDY_ROOT and level is Level.PATIENT):
        allowed = ", ".join(n for lv, n in LEVEL_NAMES.items()
                            if model is Model.PATIENT_ROOT or lv is not Level.PATIENT)
        raise IdentifierError(IDENTIFIER_MISMATCH, f"QueryRetrieveLevel must be {allowed}",
                              "QueryRetrieveLevel")
    query = Query(model, level)
    asked = [f"QueryRetrieveLevel={name}"]
    for element in identifier:
        keyword = element.keyword
        if element.tag.is_private or element.tag.element == 0 or keyword in (
                "QueryRetrieveLevel", "SpecificCharacterSet", ""):
            continue
        try:
            value, inner = _text(element)
        except (ValueError, TypeError, UnicodeError) as exc:
            raise IdentifierError(UNABLE_TO_PROCESS, f"{keyword}: {exc}", keyword) from None
        asked.append(f"{keyword}={value}")
        _add_key(query, keyword, value, inner, retrieve)
    top = Level.PATIENT if model is Model.PATIENT_ROOT else Level.STUDY
    for above in range(top, level):
        unique = UNIQUE_KEYS[Level(above)]
        if not any(m.keyword == unique for m in query.matches):
            raise IdentifierError(IDENTIFIER_MISMATCH, f"{unique} is required above the"
                                  f" {name} level", unique)
    unique = UNIQUE_KEYS[level]
    if retrieve and not any(m.keyword == unique and m.value and "*" not in m.value
                            and "?" not in m.value for m in query.matches):
        raise IdentifierError(IDENTIFIER_MISMATCH, f"{unique} (one value or a list of UIDs)"
                              f" is required at the {name} level", unique)
    query.text = "; ".join(asked)[:_AUDITED_QUERY_CHARS]
    return query


def _add_key(query: Query, keyword: str, value: str, inner: bool, retrieve: bool) -> None:
    """Add one key of the identifier to ``query``."""
    level = query.level
    known = keyword in ATTRIBUTES or keyword in _PATIENT_COUNTS or keyword == _RETRIEVE_AE
    if not known or (retrieve and keyword not in UNIQUE_KEYS.values()):
        query.empty.append(keyword)
        query.unsupported_values |= bool(value) or inner
        return
    own = level if keyword in _EVERY_LEVEL else key_level(keyword, query.model)
    unique = UNIQUE_KEYS.get(own) == keyword
    if own < level:
        if unique:
            if not value or "\\" in value or "*" in value or "?" in value:
                raise IdentifierError(IDENTIFIER_MISMATCH, f"{keyword} must be one value"
                                      " above the query level", keyword)
            query.matches.append(Match(keyword, value))
        elif value:
            raise IdentifierError(IDENTIFIER_MISMATCH, f"{keyword} is not matched at the"
                                  f" {LEVEL_NAMES[level]} level (hierarchical)", keyword)
        query.returned.append(keyword)
    elif own > level:
        if value:
            raise IdentifierError(IDENTIFIER_MISMATCH, f"{keyword} is a key of the"
                                  f" {LEVEL_NAMES[own]} level", keyword)
        query.empty.append(keyword)
    else:
        if keyword in _RETURNED_ONLY:
            query.unsupported_values |= bool(value)
        else:
            query.matches.append(Match(keyword, value))
        query.returned.append(keyword)


def _split(value: object) -> list[str]:
    return [part for part in str(value).replace(",", "\\").split("\\") if part]


def _element(keyword: str, value: object) -> DataElement:
    """A response element; None and "" are zero-length (PS3.4 C.2.2.1.2: unknown)."""
    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag)
    if vr == "SQ":
        items = []
        for sps_id, rp_id in value or []:  # type: ignore[attr-defined]
            item = Dataset()
            item.ScheduledProcedureStepID, item.RequestedProcedureID = sps_id, rp_id
            items.append(item)
        return DataElement(tag, vr, items)
    if value is None or value == "":
        return DataElement(tag, vr, None)
    if vr in ("IS", "US", "UL"):
        return DataElement(tag, vr, int(value))  # type: ignore[call-overload]
    if keyword == "ModalitiesInStudy":
        return DataElement(tag, vr, sorted(_split(value)))
    parts = str(value).split("\\")
    return DataElement(tag, vr, parts if len(parts) > 1 else parts[0])


def response(query: Query, row: dict[str, object]) -> Dataset:
    """The response identifier of one match: the keys asked for, the level and, when a
    value is not ASCII, the Specific Character Set."""
    ds = Dataset()
    ds.QueryRetrieveLevel = LEVEL_NAMES[query.level]
    for keyword in query.returned:
        ds.add(_element(keyword, row.get(keyword)))
    for keyword in query.empty:
        ds.add(_element(keyword, None))
    if any(isinstance(value, str) and not value.isascii() for value in row.values()):
        ds.SpecificCharacterSet = _UTF8
    return ds


def matches(index: Index, query: Query, ae_title: str) -> Iterator[dict[str, object]]:
    """The matches of ``query``, read from the index a page at a time, each as the values
    of its returned keys. QueryError for a value the index cannot match."""
    searched = [k for k in query.returned if k in ATTRIBUTES]
    if query.level is Level.PATIENT or any(k in query.returned for k in _PATIENT_COUNTS):
        searched += [k for k in _IDENTITY if k not in searched]
    if query.level is Level.PATIENT:
        yield from _patients(index, query, searched, ae_title)
        return
    for row in _rows(index, query.level, query.matches, searched):
        _add_counts(index, query, row, ae_title)
        yield row


def _rows(index: Index, level: Level, matches: list[Match], returned: list[str]
          ) -> Iterator[dict[str, object]]:
    offset = 0
    while True:
        page = index.search(level, matches, returned, False, _PAGE, offset)
        yield from page
        if len(page) < _PAGE:
            return
        offset += len(page)


def _patients(index: Index, query: Query, searched: list[str], ae_title: str
              ) -> Iterator[dict[str, object]]:
    """Patient-level matches: the patients of the matching studies, once each (the
    patient attributes of each study are its own, storage.index: those of its most recent
    study are the patient's)."""
    seen: set[tuple[object, ...]] = set()
    for row in _rows(index, Level.STUDY, query.matches, searched):
        key = (row["PatientID"], row["IssuerOfPatientID"])
        if key in seen:
            continue
        seen.add(key)
        _add_counts(index, query, row, ae_title)
        yield row


def _add_counts(index: Index, query: Query, row: dict[str, object], ae_title: str) -> None:
    """The values computed per patient or retrieved from the AE title."""
    if _RETRIEVE_AE in query.returned:
        row[_RETRIEVE_AE] = ae_title
    wanted = [k for k in _PATIENT_COUNTS if k in query.returned]
    if not wanted:
        return
    patient_id, issuer = row["PatientID"], row["IssuerOfPatientID"]
    studies = series = instances = 0
    counted = ["PatientID", "IssuerOfPatientID", "NumberOfStudyRelatedSeries",
               "NumberOfStudyRelatedInstances"]
    for study in _rows(index, Level.STUDY, [Match("PatientID", str(patient_id))], counted):
        # As keys, "" matches every ID and "*" or "?" any characters, "" any issuer: the
        # patient's own studies are those with the same values.
        if (study["PatientID"], study["IssuerOfPatientID"]) == (patient_id, issuer):
            studies += 1
            series += int(study["NumberOfStudyRelatedSeries"] or 0)  # type: ignore[call-overload]
            instances += int(study["NumberOfStudyRelatedInstances"] or 0)  # type: ignore[call-overload]
    row.update(zip(_PATIENT_COUNTS, (studies, series, instances), strict=True))


@dataclass
class FindService:
    """The EVT_C_FIND handler: answers, audits (one Query event per C-FIND), counts."""

    index: Index
    audit: AuditTrail
    ae_title: str
    max_matches: int

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Yield (status, identifier): a pending status per match, then a failure or
        cancel if any (pynetdicom sends the final success)."""
        requestor = event.assoc.requestor
        model = FIND_MODELS[event.request.AffectedSOPClassUID]
        level_label, result, sent, query = "unknown", "failed", 0, None
        try:
            query = parse(event.identifier, model)
            level_label = LEVEL_NAMES[query.level].lower()
            pending = PENDING_UNSUPPORTED_KEYS if query.unsupported_values else PENDING
            for row in matches(self.index, query, self.ae_title):
                if event.is_cancelled:
                    result = "cancel"
                    yield CANCEL, None
                    return
                if sent == self.max_matches:
                    result = "refused"
                    log.warning("C-FIND from %s: more than %d matches (max_find_matches)",
                                requestor.ae_title, self.max_matches)
                    yield status(TOO_MANY_MATCHES, f"more than {self.max_matches} matches"
                                 " (max_find_matches): narrow the query"), None
                    return
                sent += 1
                yield pending, response(query, row)
            result = "success"
        except IdentifierError as exc:
            result = "refused"
            log.warning("C-FIND from %s refused (0x%04X): %s", requestor.ae_title,
                        exc.status, exc.message)
            yield status(exc.status, exc.message, exc.offending), None
        except QueryError as exc:
            result = "refused"
            log.warning("C-FIND from %s refused (0x%04X): %s", requestor.ae_title,
                        UNABLE_TO_PROCESS, exc)
            yield status(UNABLE_TO_PROCESS, str(exc)), None
        except Exception as exc:  # the index failed, or an identifier pydicom cannot read
            log.exception("C-FIND from %s failed", requestor.ae_title)
            yield status(UNABLE_TO_PROCESS, f"unable to process: {type(exc).__name__}"), None
        finally:
            self._record(event, query, level_label, result, sent)

    def _record(self, event: evt.Event, query: Query | None, level: str, result: str,
                sent: int) -> None:
        requestor = event.assoc.requestor
        metrics.DIMSE_QUERIES.labels(level, result).inc()
        metrics.DIMSE_QUERY_MATCHES.labels(level).inc(sent)
        outcome = Outcome.SUCCESS if result in ("success", "cancel") else (
            Outcome.MINOR_FAILURE if result == "refused" else Outcome.SERIOUS_FAILURE)
        self.audit.record(AuditEvent(
            EventType.QUERY, "E", outcome, requestor.ae_title, requestor.address,
            query.study_uid if query else "",
            detail=f"C-FIND {level}: {sent} matches, {result}",
            query=query.text if query else ""))

