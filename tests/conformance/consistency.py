"""The registry metadata of a KOS against the KOS itself (read with pydicom from the bytes the
DocumentReference carries or references): the metadata is derived from the KOS (IHE RAD TF-3
4.68.4.1.2.4), so every identifier, date and name in it must be found there, with the same
issuer. The instances, when given, add what a KOS does not carry: the modalities.
"""

import base64
import hashlib
import re
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
KOS_TYPE = "IMG-KOS"
URI = "urn:ietf:rfc:3986"
ACCESSION = "urn:ihe:iti:xds:2013:accession"
STUDY = "urn:ihe:iti:xds:2016:studyInstanceUID"
ORDER = "urn:ihe:iti:xds:2013:order"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_GENDERS = {"M": "male", "F": "female", "O": "other"}
# The INS assigning authorities (ANS, fr-core-patient-ins): the national identifier, which a
# DocumentReference subject must be when the KOS carries it.
_INS_AUTHORITIES = {"1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10",
                    "1.2.250.1.213.1.4.11"}


def _oids(sequence: object) -> set[str]:
    """The ISO Universal Entity IDs of an Issuer ... Sequence (HL7 v2 HD, PS3.3 10.14)."""
    return {str(item.UniversalEntityID) for item in sequence or []
            if "UniversalEntityID" in item and item.get("UniversalEntityIDType") == "ISO"}


def _patient_identifiers(kos: Dataset) -> set[tuple[str, str]]:
    """(urn:oid:issuer, value) of every patient identifier the KOS gives with an issuer."""
    found = set()
    issuers = _oids(kos.get("IssuerOfPatientIDQualifiersSequence"))
    if re.fullmatch(r"[0-9]+(\.[0-9]+)+", str(kos.get("IssuerOfPatientID", ""))):
        issuers.add(str(kos.IssuerOfPatientID))
    found |= {(f"urn:oid:{oid}", str(kos.PatientID)) for oid in issuers}
    for other in kos.get("OtherPatientIDsSequence", []):
        found |= {(f"urn:oid:{oid}", str(other.PatientID))
                  for oid in _oids(other.get("IssuerOfPatientIDQualifiersSequence"))}
    return found


def _accessions(kos: Dataset) -> set[tuple[str, str]]:
    """(urn:oid:issuer or "", accession) at top level and in each Referenced Request."""
    found = set()
    for item in [kos, *kos.get("ReferencedRequestSequence", [])]:
        number = str(item.get("AccessionNumber", ""))
        if number:
            oids = _oids(item.get("IssuerOfAccessionNumberSequence")) or {""}
            found |= {(f"urn:oid:{oid}" if oid else "", number) for oid in oids}
    return found


def _orders(kos: Dataset) -> set[tuple[str, str]]:
    found = set()
    for item in kos.get("ReferencedRequestSequence", []):
        number = str(item.get("PlacerOrderNumberImagingServiceRequest", ""))
        if number:
            oids = _oids(item.get("OrderPlacerIdentifierSequence")) or {""}
            found |= {(f"urn:oid:{oid}" if oid else "", number) for oid in oids}
    return found


def _related(document: dict, kind: str) -> set[tuple[str, str]]:
    return {((r.get("identifier") or {}).get("system", ""),
             (r.get("identifier") or {}).get("value", ""))
            for r in (document.get("context") or {}).get("related", [])
            if any(c.get("code") == kind for c in
                   ((r.get("identifier") or {}).get("type") or {}).get("coding", []))}


def _contained(resource: dict, reference: object) -> dict:
    target = (reference or {}).get("reference", "") if isinstance(reference, dict) else ""
    return next((c for c in resource.get("contained", []) if f"#{c.get('id')}" == target), {})


def _name_groups(name: PersonName) -> list[list[str]]:
    """The non-empty component groups of a PN (PS3.5 6.2.1), each as its components."""
    groups = [str(g or "") for g in (name.alphabetic, name.ideographic, name.phonetic)]
    return [group.split("^") for group in groups if group.strip("^ ")]


def _expected_date(date: str, time: str) -> str:
    """The FHIR date (or date and time, to the minute or second given) of a DA and TM."""
    if not re.fullmatch(r"[0-9]{8}", date):
        return ""
    text = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    digits = re.sub(r"[^0-9]", "", time.split(".")[0])
    if len(digits) >= 4:
        text += f"T{digits[:2]}:{digits[2:4]}" + (f":{digits[4:6]}" if len(digits) >= 6
                                                  else "")
    return text


def _check_patient(kos: Dataset, document: dict, problems: list[str]) -> None:
    known = _patient_identifiers(kos)
    subject = (document.get("subject") or {}).get("identifier") or {}
    if (subject.get("system"), subject.get("value")) not in known:
        problems.append(f"subject {subject.get('system')}|{subject.get('value')} is not a "
                        f"patient identifier of the KOS with its issuer ({sorted(known)})")
    ins = sorted(i for i in known if i[0].removeprefix("urn:oid:") in _INS_AUTHORITIES)
    if ins and (subject.get("system"), subject.get("value")) not in ins:
        problems.append(f"subject {subject.get('system')}|{subject.get('value')} is not the "
                        f"INS the KOS carries ({ins})")
    patient = _contained(document, (document.get("context") or {}).get("sourcePatientInfo"))
    for identifier in patient.get("identifier", []):
        if (identifier.get("system"), identifier.get("value")) not in known:
            problems.append(f"sourcePatientInfo identifier {identifier.get('system')}|"
                            f"{identifier.get('value')} is not in the KOS with that issuer "
                            "(PatientID + IssuerOfPatientIDQualifiersSequence, or "
                            "OtherPatientIDsSequence)")
    names = patient.get("name", [])
    for n, name in enumerate(names):
        parts = [name.get("family", ""), *name.get("given", [])]
        if any(re.search(r"[=^]", part) for part in parts):
            problems.append(f"sourcePatientInfo name[{n}] {parts} carries PN delimiters "
                            "(= or ^): component groups are separate names (PS3.5 6.2.1)")
    for group in _name_groups(kos.PatientName):
        family, given = group[0], [g for g in group[1:3] if g]
        if not any(name.get("family", "") == family and given == name.get("given", [])[
                :len(given)] for name in names):
            problems.append(f"sourcePatientInfo has no name {family!r} {given} "
                            f"(PatientName group {'^'.join(group)!r})")
    birth = str(kos.get("PatientBirthDate", ""))
    expected = _expected_date(birth, "")
    if patient.get("birthDate", "") != expected:
        problems.append(f"sourcePatientInfo birthDate {patient.get('birthDate')!r}, KOS "
                        f"PatientBirthDate {birth!r}")
    sex = _GENDERS.get(str(kos.get("PatientSex", "")).strip().upper(), "unknown")
    if patient.get("gender", "unknown") != sex:
        problems.append(f"sourcePatientInfo gender {patient.get('gender')!r}, KOS PatientSex "
                        f"{kos.get('PatientSex', '')!r}")


def _check_requests(kos: Dataset, document: dict, problems: list[str]) -> None:
    accessions, related = _accessions(kos), _related(document, ACCESSION)
    if related != accessions:
        problems.append(f"referenceIdList accessions {sorted(related)} != the KOS's "
                        f"(AccessionNumber + IssuerOfAccessionNumberSequence) "
                        f"{sorted(accessions)}")
    for system, value in related:
        if not system:
            problems.append(f"accession {value!r} has no assigning authority (system)")
    studies = _related(document, STUDY)
    if {value for _, value in studies} != {str(kos.StudyInstanceUID)}:
        problems.append(f"referenceIdList study {sorted(studies)} != KOS StudyInstanceUID "
                        f"{kos.StudyInstanceUID}")
    # An order the KOS gives without its authority (no OrderPlacerIdentifierSequence) is left
    # out of the metadata: a bare number names nothing outside the RIS, and an order must not
    # hold back the study (the accession identifies the request). That omission only.
    orders = {(system, value) for system, value in _orders(kos) if system}
    related_orders = _related(document, ORDER)
    if related_orders != orders:
        problems.append(f"referenceIdList orders {sorted(related_orders)} != the KOS's with "
                        f"their OrderPlacerIdentifierSequence {sorted(orders)}")


def _check_document(kos: Dataset, data: bytes, document: dict, problems: list[str]) -> None:
    master = (document.get("masterIdentifier") or {}).get("value")
    if master != f"urn:oid:{kos.SOPInstanceUID}":
        problems.append(f"masterIdentifier {master!r} is not the KOS SOP Instance UID "
                        f"{kos.SOPInstanceUID}")
    if kos.SOPClassUID != KOS_SOP_CLASS:
        problems.append(f"the document is not a KOS (SOP Class {kos.SOPClassUID})")
    title = kos.get("ConceptNameCodeSequence") or [Dataset()]
    if (title[0].get("CodeValue"), title[0].get("CodingSchemeDesignator")) != ("113030", "DCM"):
        problems.append("the KOS title is not (113030, DCM, Manifest) (IHE XDS-I.b)")
    types = {c.get("code") for c in (document.get("type") or {}).get("coding", [])}
    if KOS_TYPE not in types:
        problems.append(f"DocumentReference.type {sorted(types)} is not {KOS_TYPE}, the type "
                        "of an imaging manifest (TRE_A05)")
    [content] = document.get("content") or [{}]
    if (content.get("format") or {}).get("code") != str(kos.SOPClassUID):
        problems.append(f"content.format {content.get('format')} is not the KOS SOP Class")
    attachment = content.get("attachment") or {}
    if attachment.get("size") != len(data):
        problems.append("attachment.size is not the size of the KOS")
    if attachment.get("hash") != base64.b64encode(hashlib.sha1(data).digest()).decode():
        problems.append("attachment.hash is not the SHA-1 of the KOS (FHIR Attachment.hash)")
    period = (document.get("context") or {}).get("period") or {}
    expected = _expected_date(str(kos.get("StudyDate", "")), str(kos.get("StudyTime", "")))
    start = period.get("start", "")
    if expected and not start.startswith(expected):
        problems.append(f"context.period.start {start!r} is not the KOS StudyDate/StudyTime "
                        f"({expected})")
    if not expected and start:
        problems.append(f"context.period.start {start!r} while the KOS has no StudyDate: "
                        "a date that is not the study's")
    institution = str(kos.get("InstitutionName", ""))
    organizations = {c.get("name") for c in document.get("contained", [])
                     if c.get("resourceType") == "Organization"}
    if institution and institution not in organizations:
        problems.append(f"KOS InstitutionName {institution!r} is not the author institution "
                        f"of the metadata ({sorted(filter(None, organizations))})")


_REQUEST_KEYS = ("RequestedProcedureID", "RequestedProcedureDescription",
                 "PlacerOrderNumberImagingServiceRequest",
                 "FillerOrderNumberImagingServiceRequest")


def _request_pairs(kos: Dataset, instances: Sequence[Path], problems: list[str]) -> None:
    """Each request of the instances (Request Attributes Sequence: Requested Procedure ID and
    Description with their placer and filler orders) is one Referenced Request item of the
    KOS, paired the same (PS3.3 C.17.6.2.1)."""
    made = {tuple(str(item.get(key, "")) for key in _REQUEST_KEYS)
            for item in kos.get("ReferencedRequestSequence", [])}
    for path in instances:
        ds = dcmread(path, stop_before_pixels=True)
        for item in ds.get("RequestAttributesSequence", []):
            request = tuple(str(item.get(key, "")) for key in _REQUEST_KEYS)
            if request not in made:
                problems.append(f"request {request} of {path.name} is not a Referenced "
                                f"Request of the KOS ({sorted(made)})")
                return


def metadata_problems(document: dict, kos_data: bytes, submission_set: dict | None = None,
                      instances: Sequence[Path] = ()) -> list[str]:
    """Every disagreement between a DocumentReference (and its SubmissionSet) and its KOS."""
    kos = dcmread(BytesIO(kos_data))
    problems: list[str] = []
    _check_document(kos, kos_data, document, problems)
    _check_patient(kos, document, problems)
    _check_requests(kos, document, problems)
    if submission_set is not None and submission_set.get("subject") != document.get("subject"):
        problems.append("the SubmissionSet and the DocumentReference name different subjects")
    if instances:
        _request_pairs(kos, instances, problems)
        modalities = {str(dcmread(path, stop_before_pixels=True).get("Modality", ""))
                      for path in instances} - {""}
        events = {c.get("code") for e in (document.get("context") or {}).get("event", [])
                  for c in e.get("coding", []) if c.get("system") == DCM}
        if events != modalities:
            problems.append(f"context.event modalities {sorted(events)} != the instances' "
                            f"{sorted(modalities)}")
    return problems
