"""What the index keeps of an instance, read from its header without decoding pixels, once
its structure is known to be within the ingest limits (``storage.structure``)."""

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.filereader
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset

from storage.identifiers import Issuer, OtherPatientId, Request, encode
from storage.structure import (
    PIXEL_DATA_TAGS,
    IngestLimits,
    UnreadableDatasetError,
    encoded_dataset,
    walk,
)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """Patient, study, series and instance attributes of one received instance."""

    patient_id: str
    issuer_of_patient_id: str
    # JSON {"universal", "universal_type"} of Issuer of Patient ID Qualifiers Sequence, or ""
    patient_id_qualifiers: str
    other_patient_ids: str  # JSON list of {"id", "type", "issuer"}: the INS lives here
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_uid: str
    character_set: str  # Specific Character Set, its values joined by backslashes
    study_date: str
    study_time: str
    accession_number: str
    accession_issuer: str  # JSON {"local", "universal", "universal_type"} or ""
    study_id: str
    study_description: str
    referring_physician: str
    requested_procedure_ids: str  # JSON list
    placer_order_numbers: str  # JSON list
    requests: str  # JSON list of Request objects (of the series)
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    series_date: str
    series_time: str
    sop_class_uid: str
    sop_uid: str
    instance_number: int | None
    transfer_syntax: str
    rows: int | None
    columns: int | None
    frames: int | None
    timezone_offset: str  # Timezone Offset From UTC (0008,0201), "" when absent
    bits_allocated: int | None
    pps_start_date: str  # Performed Procedure Step Start Date (0040,0244)
    pps_start_time: str  # Performed Procedure Step Start Time (0040,0245)
    request_attributes: str  # JSON list of [Scheduled Procedure Step ID, Requested Procedure ID]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _issuer(local: str, universal: Dataset | None) -> Issuer:
    """An issuer from its local namespace and the item holding its universal id."""
    if universal is None:
        return Issuer(local)
    return Issuer(local, _text(universal, "UniversalEntityID"),
                  _text(universal, "UniversalEntityIDType"))


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    items = ds.get(keyword) or []
    return items[0] if items else None


def _accession_issuer_of(ds: Dataset) -> Issuer:
    item = _first_item(ds, "IssuerOfAccessionNumberSequence")
    return _issuer(_text(item, "LocalNamespaceEntityID"), item) if item else Issuer()


def _accession_issuer(ds: Dataset) -> str:
    return encode(_accession_issuer_of(ds).to_json())


def _patient_id_qualifiers(ds: Dataset) -> str:
    """The universal id of the Patient ID's authority (PS3.3 Table 10-18: the same authority
    as Issuer of Patient ID, named universally)."""
    return encode(_issuer("", _first_item(ds, "IssuerOfPatientIDQualifiersSequence"))
                  .to_json())


def _other_patient_ids(ds: Dataset) -> str:
    return encode([OtherPatientId(
        _text(item, "PatientID"), _text(item, "TypeOfPatientID"),
        _issuer(_text(item, "IssuerOfPatientID"),
                _first_item(item, "IssuerOfPatientIDQualifiersSequence"))).to_json()
        for item in ds.get("OtherPatientIDsSequence") or []])


def _request_identifiers(ds: Dataset) -> tuple[str, str]:
    """Requested Procedure IDs and Placer Order Numbers, top level and Request Attributes."""
    # Dicts as ordered sets: distinct values in linear time (thousands of items are allowed).
    procedures: dict[str, None] = {}
    orders: dict[str, None] = {}
    for item in [ds, *(ds.get("RequestAttributesSequence") or [])]:
        for keyword, bucket in (("RequestedProcedureID", procedures),
                                ("PlacerOrderNumberImagingServiceRequest", orders)):
            if value := _text(item, keyword):
                bucket.setdefault(value)
    return encode(list(procedures)), encode(list(orders))


def _request_attributes(ds: Dataset) -> str:
    """The (Scheduled Procedure Step ID, Requested Procedure ID) of each Request Attributes
    item, as QIDO-RS returns them at the series level (PS3.18 Table 10.6.3-4)."""
    return encode([[_text(item, "ScheduledProcedureStepID"), _text(item, "RequestedProcedureID")]
                   for item in ds.get("RequestAttributesSequence") or []])


def _requests(ds: Dataset) -> str:
    """The distinct requests of the instance, each kept whole (PS3.3 Table 10-9): an item's
    accession defaults to the instance's, as the item is a request of this study."""
    items = list(ds.get("RequestAttributesSequence") or []) or [ds]
    found: dict[Request, None] = {}  # an ordered set: linear in the number of items
    for item in items:
        request = Request(
            _text(item, "AccessionNumber") or _text(ds, "AccessionNumber"),
            _accession_issuer_of(item) if _text(item, "AccessionNumber")
            else _accession_issuer_of(ds),
            _text(item, "RequestedProcedureID"), _text(item, "RequestedProcedureDescription"),
            _text(item, "PlacerOrderNumberImagingServiceRequest"),
            _text(item, "FillerOrderNumberImagingServiceRequest"))
        identifiers = (request.accession, request.procedure_id, request.placer_order,
                       request.filler_order)
        if any(identifiers):
            found.setdefault(request)
    return encode([request.to_json() for request in found])


# What read_header reads; pydicom skips the value of any other element of defined length.
_HEADER_TAGS = [keyword_dict[keyword] for keyword in (
    "SpecificCharacterSet", "PatientID", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence",
    "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "RequestAttributesSequence", "RequestedProcedureID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "RequestedProcedureDescription", "SeriesInstanceUID", "Modality", "SeriesNumber",
    "SeriesDescription", "BodyPartExamined", "SeriesDate", "SeriesTime", "SOPClassUID",
    "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
    "TimezoneOffsetFromUTC", "BitsAllocated", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime")]


@contextmanager
def _opened(source: bytes | Path) -> Iterator[BinaryIO]:
    if isinstance(source, Path):
        with source.open("rb", buffering=1 << 16) as file:
            yield file
    else:
        yield io.BytesIO(source)


def read_header(source: bytes | Path, limits: IngestLimits | None = None,
                scratch: Callable[[], BinaryIO] | None = None) -> InstanceRecord:
    """Parse a Part 10 file's header (never its pixel data) into an InstanceRecord; with
    ``limits``, only once ``check_structure`` found the data set within them.

    A deflated data set (PS3.5 A.5) is inflated as a stream into a ``scratch()`` file
    (default: an anonymous temporary file), never whole in memory: with ``limits``, it is
    refused past max_instance_bytes inflated before pydicom reads any of it.
    """
    with _opened(source) as file, encoded_dataset(file, limits, scratch) as (dataset, syntax):
        if limits is not None:
            start = dataset.tell()
            walk(dataset, syntax, limits)
            dataset.seek(start)
        try:
            if dataset is file:
                file.seek(0)
                ds = pydicom.dcmread(file, stop_before_pixels=True,
                                     specific_tags=_HEADER_TAGS)
            else:  # inflated: what pydicom would have read from memory
                ds = pydicom.filereader.read_dataset(
                    dataset, is_implicit_VR=False, is_little_endian=True,
                    stop_when=_at_pixel_data, specific_tags=_HEADER_TAGS)
            return _record(ds, syntax or "")
        except Exception as exc:  # pydicom raises many types on malformed input
            raise UnreadableDatasetError(f"cannot parse data set: {exc}") from exc


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    """The ``stop_when`` of pydicom's ``stop_before_pixels``."""
    return tag in PIXEL_DATA_TAGS


def _record(ds: Dataset, transfer_syntax: str) -> InstanceRecord:
    procedures, orders = _request_identifiers(ds)
    rows = _int(ds, "Rows")
    frames = _int(ds, "NumberOfFrames") or (1 if rows else None)
    return InstanceRecord(
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_id_qualifiers=_patient_id_qualifiers(ds),
        other_patient_ids=_other_patient_ids(ds),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        study_uid=_text(ds, "StudyInstanceUID"),
        character_set=_text(ds, "SpecificCharacterSet"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        accession_issuer=_accession_issuer(ds),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        referring_physician=_text(ds, "ReferringPhysicianName"),
        requested_procedure_ids=procedures,
        placer_order_numbers=orders,
        requests=_requests(ds),
        series_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined"),
        series_date=_text(ds, "SeriesDate"),
        series_time=_text(ds, "SeriesTime"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        instance_number=_int(ds, "InstanceNumber"),
        transfer_syntax=transfer_syntax,
        rows=rows,
        columns=_int(ds, "Columns"),
        frames=frames,
        timezone_offset=_text(ds, "TimezoneOffsetFromUTC"),
        bits_allocated=_int(ds, "BitsAllocated"),
        pps_start_date=_text(ds, "PerformedProcedureStepStartDate"),
        pps_start_time=_text(ds, "PerformedProcedureStepStartTime"),
        request_attributes=_request_attributes(ds),
    )
