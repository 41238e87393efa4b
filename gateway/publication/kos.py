"""The study manifest: a Key Object Selection Document (PS3.3 A.35.4) following TID 2010
"Key Object Selection" with the title (113030, DCM, "Manifest"), as IHE RAD XDS-I.b wants
it: every instance of the study in the evidence sequence, with where to retrieve each series.
"""

import hashlib
import time
from dataclasses import dataclass, replace
from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from gateway.urls import dicomweb_root, retrieve_url
from storage.identifiers import Issuer
from storage.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from storage.study_contents import StudyContents
from storage.uids import uid_from_digest

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
KOS_SERIES_NUMBER = 999


@dataclass(frozen=True)
class RetrieveOrigin:
    """Where consumers retrieve the referenced instances (XDS-I.b, RAD TF-3 4.68.4.1.2.3)."""

    public_url: str  # base URL of this gateway; DICOMweb lives under /dicom-web
    ae_title: str
    location_uid: str  # Retrieve Location UID: this gateway as an imaging source
    institution_name: str = ""


@dataclass(frozen=True)
class Manifest:
    """A built manifest: its Part 10 bytes and identity."""

    sop_uid: str
    series_uid: str
    data: bytes


def manifest_uid(study: StudyContents, revision: int = 0) -> str:
    """The KOS SOP Instance UID: the same for the same study content, new when it changes.

    ``revision`` counts withdrawals: a study published again after being withdrawn gets a
    new uniqueId: a registry refuses one it already holds (XDSDuplicateUniqueIdInRegistry)."""
    lines = [study.study_uid, *sorted(study.sop_uids), *([f"revision {revision}"] if revision
                                                          else [])]
    return uid_from_digest(hashlib.sha256(b"kos\n" + "\n".join(lines).encode()).digest())


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _issuer(issuer: Issuer) -> Sequence:
    """An HL7 v2 HD issuer as an Issuer of ... Sequence (PS3.3 10.14), or an empty one."""
    if not issuer:
        return Sequence()
    item = Dataset()
    if issuer.local:
        item.LocalNamespaceEntityID = issuer.local
    if issuer.universal:
        item.UniversalEntityID = issuer.universal
        item.UniversalEntityIDType = issuer.universal_type or "ISO"
    return Sequence([item])


def _patient(ds: Dataset, study: StudyContents) -> None:
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    if study.issuer_of_patient_id:
        ds.IssuerOfPatientID = study.issuer_of_patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    others = []
    for entry in study.other_patient_ids:  # the INS travels here (issuer 1.2.250.1.213.1.4.8)
        item = Dataset()
        item.PatientID = entry.id
        item.TypeOfPatientID = entry.type or "TEXT"
        if entry.issuer.local:
            item.IssuerOfPatientID = entry.issuer.local
        if entry.issuer.universal:
            item.IssuerOfPatientIDQualifiersSequence = _issuer(
                replace(entry.issuer, local=""))
        others.append(item)
    if others:
        ds.OtherPatientIDsSequence = Sequence(others)


def _requests(study: StudyContents) -> Sequence:
    """Referenced Request Sequence (PS3.3 C.17.6.2.1): one item per requested procedure /
    placer order, paired in the order they were received."""
    procedures, orders = study.requested_procedure_ids, study.placer_order_numbers
    items = []
    for n in range(max(1, len(procedures), len(orders))):
        item = Dataset()
        item.StudyInstanceUID = study.study_uid
        item.ReferencedStudySequence = Sequence()
        item.AccessionNumber = study.accession_number
        item.IssuerOfAccessionNumberSequence = _issuer(study.accession_issuer)
        item.RequestedProcedureID = procedures[n] if n < len(procedures) else ""
        item.PlacerOrderNumberImagingServiceRequest = orders[n] if n < len(orders) else ""
        item.FillerOrderNumberImagingServiceRequest = ""
        item.RequestedProcedureDescription = ""
        item.RequestedProcedureCodeSequence = Sequence()
        items.append(item)
    return Sequence(items)


def _value_type(sop_class: str) -> str:
    """IMAGE, WAVEFORM or COMPOSITE: the TID 2010 row that may reference this SOP class."""
    name = UID(sop_class).name
    if "Image Storage" in name:
        return "IMAGE"
    return "WAVEFORM" if "Waveform" in name else "COMPOSITE"


def _reference(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
    return item


def _evidence(study: StudyContents, origin: RetrieveOrigin) -> Sequence:
    """Current Requested Procedure Evidence Sequence, series-level retrieve information."""
    series_items = []
    for series in study.series:
        item = Dataset()
        item.SeriesInstanceUID = series.series_uid
        item.RetrieveURL = retrieve_url(dicomweb_root(origin.public_url), study.study_uid,
                                        series.series_uid)
        item.RetrieveLocationUID = origin.location_uid
        item.RetrieveAETitle = origin.ae_title
        item.ReferencedSOPSequence = Sequence(
            [_reference(sop_class, sop_uid) for sop_class, sop_uid in series.instances])
        series_items.append(item)
    study_item = Dataset()
    study_item.StudyInstanceUID = study.study_uid
    study_item.ReferencedSeriesSequence = Sequence(series_items)
    return Sequence([study_item])


def _content(study: StudyContents) -> Sequence:
    items = []
    for series in study.series:
        for sop_class, sop_uid in series.instances:
            item = Dataset()
            item.RelationshipType = "CONTAINS"
            item.ValueType = _value_type(sop_class)
            item.ReferencedSOPSequence = Sequence([_reference(sop_class, sop_uid)])
            items.append(item)
    return Sequence(items)


def build_manifest(study: StudyContents, origin: RetrieveOrigin, revision: int = 0) -> Manifest:
    """The KOS manifest of ``study``; same content, same bytes (UIDs and content date
    derive from the study, so a rebuild is identical)."""
    if not study.series:
        raise ValueError(f"study {study.study_uid} has no instance to reference")
    sop_uid = manifest_uid(study, revision)
    series_uid = uid_from_digest(hashlib.sha256(f"kos-series\n{study.study_uid}".encode())
                                 .digest())
    created = time.localtime(study.last_received_at)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate, ds.StudyTime = study.study_date, study.study_time
    ds.ContentDate = time.strftime("%Y%m%d", created)
    ds.ContentTime = time.strftime("%H%M%S", created)
    ds.AccessionNumber = study.accession_number
    ds.IssuerOfAccessionNumberSequence = _issuer(study.accession_issuer)
    ds.Modality = "KO"
    ds.Manufacturer = "Passerelle"
    if origin.institution_name:
        ds.InstitutionName = origin.institution_name
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyDescription = study.study_description
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    _patient(ds, study)
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = KOS_SERIES_NUMBER
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("113030", "DCM", "Manifest")])
    ds.ContinuityOfContent = "SEPARATE"
    if study.accession_number or study.placer_order_numbers or study.requested_procedure_ids:
        ds.ReferencedRequestSequence = _requests(study)
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(study, origin)
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = Sequence([template])
    ds.ContentSequence = _content(study)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = KOS_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return Manifest(sop_uid=sop_uid, series_uid=series_uid, data=out.getvalue())
