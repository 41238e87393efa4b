"""The study manifest: a Key Object Selection Document (PS3.3 A.35.4) following TID 2010
"Key Object Selection" with the title (113030, DCM, "Manifest"), as IHE RAD XDS-I.b wants
it: every instance of the study in the evidence sequence, with where to retrieve each series.
"""

import hashlib
import json
import time
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from gateway.urls import dicomweb_root, retrieve_url
from storage.identifiers import Issuer, Request
from storage.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from storage.study_contents import StudyContents
from storage.uids import oid_of, uid_from_digest

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
KOS_SERIES_NUMBER = 999
UTF8 = "ISO_IR 192"
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})


@dataclass(frozen=True)
class RetrieveOrigin:
    """Where consumers retrieve the referenced instances (XDS-I.b, RAD TF-3 4.68.4.1.2.3):
    DICOMweb, and the AE title of our C-MOVE / C-GET SCP when it is offered."""

    public_url: str  # base URL of this gateway; DICOMweb lives under /dicom-web
    location_uid: str  # Retrieve Location UID: this gateway as an imaging source
    institution_name: str = ""
    ae_title: str = ""  # Retrieve AE Title (PS3.3 C.17.2.1); "": Q/R not offered


@dataclass(frozen=True)
class Issuers:
    """The configured assigning authorities (OIDs, "" = none), written into the manifest
    where the instances name none: the registry metadata is read from the manifest."""

    patient_id: str = ""
    accession: str = ""
    order: str = ""


@dataclass(frozen=True)
class Manifest:
    """A built manifest: its Part 10 bytes and identity."""

    sop_uid: str
    series_uid: str
    data: bytes


# What the manifest states that does not identify it: its own UIDs (derived from the rest)
# and its content date and time (the last reception, which a resent identical study moves).
_NOT_DIGESTED = ("00080018", "00080023", "00080033")


def manifest_uid(ds: Dataset, revision: int = 0) -> str:
    """The KOS SOP Instance UID of the manifest ``ds`` (every attribute but its SOP Instance
    UID, content date and time): the same for the same content, new whenever what the
    manifest states changes (a study corrected and resent, an issuer configured), so that
    the new manifest replaces the published one instead of being taken for it.

    ``revision`` counts withdrawals: a study published again after being withdrawn gets a
    new uniqueId: a registry refuses one it already holds (XDSDuplicateUniqueIdInRegistry)."""
    content = {tag: value for tag, value in ds.to_json_dict().items()
               if tag not in _NOT_DIGESTED}
    text = json.dumps([content, revision], sort_keys=True, ensure_ascii=False)
    return uid_from_digest(hashlib.sha256(b"kos\n" + text.encode()).digest())


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _hd(issuer: Issuer) -> Dataset:
    """An HL7 v2 Hierarchic Designator item (PS3.3 Table 10-17): a local namespace, a
    universal id with its type (ISO when unsaid), or both."""
    item = Dataset()
    if issuer.local:
        item.LocalNamespaceEntityID = issuer.local
    if issuer.universal:
        item.UniversalEntityID = issuer.universal
        item.UniversalEntityIDType = issuer.universal_type or "ISO"
    return item


def _completed(issuer: Issuer, configured_oid: str) -> Issuer:
    """The instances' issuer, given the configured OID as its universal id when it has none
    (PS3.3 Table 10-17: Local Namespace Entity ID and Universal Entity ID name the same
    entity; the setting is the OID of the authority the instances name locally, or not at
    all). A universal id of the instances, of any type, is theirs to state: never replaced."""
    if issuer.universal or oid_of(issuer.local) or not configured_oid:
        return issuer
    return Issuer(issuer.local, configured_oid, "ISO")


def _patient_id_authority(issuer: Issuer, configured_oid: str) -> Issuer:
    """The universal id of the Patient ID's authority (Issuer of Patient ID Qualifiers
    Sequence, PS3.3 C.7.1.1 and Table 10-18, "the same as that of Issuer of Patient ID"):
    the instances' own, else Issuer of Patient ID when it is an OID, else the configured one."""
    if issuer.universal:
        return Issuer("", issuer.universal, issuer.universal_type)
    return Issuer("", oid_of(issuer.local) or configured_oid, "ISO")


def _set_accession_issuer(item: Dataset, issuer: Issuer) -> None:
    """Issuer of Accession Number Sequence (Type 3): one item, or absent, never empty
    (an empty sequence is a zero-item error for dciodvfy)."""
    if issuer:
        item.IssuerOfAccessionNumberSequence = Sequence([_hd(issuer)])


def _patient(ds: Dataset, study: StudyContents, issuers: Issuers) -> None:
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    if study.issuer_of_patient_id:
        ds.IssuerOfPatientID = study.issuer_of_patient_id
    authority = _patient_id_authority(study.patient_id_issuer, issuers.patient_id)
    if authority and study.patient_id:
        ds.IssuerOfPatientIDQualifiersSequence = Sequence([_hd(authority)])
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
            item.IssuerOfPatientIDQualifiersSequence = Sequence(
                [_hd(Issuer("", entry.issuer.universal, entry.issuer.universal_type))])
        others.append(item)
    if others:
        ds.OtherPatientIDsSequence = Sequence(others)


def _study_requests(study: StudyContents) -> list[Request]:
    """The distinct requests of the study's series in the order received, each as the
    instances paired its identifiers; the study's own accession when no series has any."""
    found: list[Request] = []
    for series in study.series:
        found += [request for request in series.requests if request not in found]
    if not found and study.accession_number:
        found.append(Request(study.accession_number, study.accession_issuer))
    return found


def _requests(study: StudyContents, requests: list[Request], issuers: Issuers) -> Sequence:
    """Referenced Request Sequence (PS3.3 C.17.6.2.1): one item per distinct request."""
    items = []
    for request in requests:
        item = Dataset()
        item.StudyInstanceUID = study.study_uid
        item.ReferencedStudySequence = Sequence()
        item.AccessionNumber = request.accession
        if request.accession:
            _set_accession_issuer(item, _completed(request.accession_issuer,
                                                   issuers.accession))
        item.PlacerOrderNumberImagingServiceRequest = request.placer_order
        if request.placer_order and issuers.order:
            item.OrderPlacerIdentifierSequence = Sequence(
                [_hd(Issuer("", issuers.order, "ISO"))])
        item.FillerOrderNumberImagingServiceRequest = request.filler_order
        item.RequestedProcedureID = request.procedure_id
        item.RequestedProcedureDescription = request.procedure_description
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
    """Current Requested Procedure Evidence Sequence, series-level retrieve information.

    Retrieve AE Title is Type 3 in the Hierarchical Series Reference Macro (PS3.3 Table
    C.17-3) and names a C-MOVE / C-GET SCP: left out, as none is served. Consumers find the
    source by Retrieve Location UID (RAD TF-3 4.68.4.1.2.3) and fetch by Retrieve URL."""
    series_items = []
    for series in study.series:
        item = Dataset()
        item.SeriesInstanceUID = series.series_uid
        item.RetrieveURL = retrieve_url(dicomweb_root(origin.public_url), study.study_uid,
                                        series.series_uid)
        item.RetrieveLocationUID = origin.location_uid
        if origin.ae_title:
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


def _texts(ds: Dataset) -> list[str]:
    return [str(element.value) for element in ds.iterall() if element.VR in _TEXT_VRS]


def _holds(character_set: str, texts: list[str]) -> bool:
    """Whether each character of ``texts`` has a code in one of the character set's
    repertoires (PS3.3 C.12.1.1.2; none named: the default repertoire, ASCII)."""
    try:
        codecs = convert_encodings(character_set.split("\\")) if character_set else ["ascii"]
    except LookupError:
        return False

    def encodable(char: str, codec: str) -> bool:
        try:
            char.encode(codec)
        except UnicodeError:
            return False
        return True

    return all(any(encodable(char, codec) for codec in codecs)
               for text in texts for char in set(text))


def _saved(ds: Dataset, character_set: str) -> bytes:
    if character_set:
        ds.SpecificCharacterSet = character_set.split("\\") if "\\" in character_set \
            else character_set
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _encoded(ds: Dataset, character_set: str) -> bytes:
    """Part 10 bytes in the instances' own character set when it holds every text value, so
    that the manifest repeats their patient and study attributes byte for byte (dcentvfy
    compares them so); else in UTF-8."""
    texts = _texts(ds)
    if character_set != UTF8 and _holds(character_set, texts):
        data = _saved(ds, character_set)
        if _texts(dcmread(BytesIO(data))) == texts:
            return data
    return _saved(ds, UTF8)


def build_manifest(study: StudyContents, origin: RetrieveOrigin, issuers: Issuers = Issuers(),
                   revision: int = 0) -> Manifest:
    """The KOS manifest of ``study``, with ``issuers`` where the instances name none. Its
    UID derives from what it states (``manifest_uid``), its content date from the last
    reception: the same study as indexed rebuilds to the same bytes."""
    if not study.series:
        raise ValueError(f"study {study.study_uid} has no instance to reference")
    series_uid = uid_from_digest(hashlib.sha256(f"kos-series\n{study.study_uid}".encode())
                                 .digest())
    created = time.localtime(study.last_received_at)
    ds = Dataset()
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.StudyDate, ds.StudyTime = study.study_date, study.study_time
    ds.ContentDate = time.strftime("%Y%m%d", created)
    ds.ContentTime = time.strftime("%H%M%S", created)
    ds.AccessionNumber = study.accession_number
    if study.accession_number:
        _set_accession_issuer(ds, _completed(study.accession_issuer, issuers.accession))
    ds.Modality = "KO"
    ds.Manufacturer = "Passerelle"
    if origin.institution_name:
        ds.InstitutionName = origin.institution_name
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyDescription = study.study_description
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    _patient(ds, study, issuers)
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = KOS_SERIES_NUMBER
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("113030", "DCM", "Manifest")])
    ds.ContinuityOfContent = "SEPARATE"
    requests = _study_requests(study)
    if requests:  # Type 1C: made for these requests (PS3.3 C.17.6.2.1)
        ds.ReferencedRequestSequence = _requests(study, requests, issuers)
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(study, origin)
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = Sequence([template])
    ds.ContentSequence = _content(study)
    sop_uid = manifest_uid(ds, revision)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = KOS_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return Manifest(sop_uid=sop_uid, series_uid=series_uid,
                    data=_encoded(ds, study.character_set))
