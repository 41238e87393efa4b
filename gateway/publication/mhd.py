"""IHE MHD resources for the French PDSm profile: the ITI-65 "Provide Document Bundle" that
publishes a KOS manifest (flux 1), and the patches that update it (flux 3).

Every patient, study and request element is read from the manifest itself (IHE RAD TF-3
4.68.4.1.2.4: the XDS-I.b metadata come from the KOS), so the registry metadata and the
document cannot disagree; the event codes (the modalities and regions of the referenced
series) and the producer's own metadata are passed in.

Codes and shapes follow the PDSm 3.1.1 IG (https://interop.esante.gouv.fr/ig/fhir/pdsm; its
profiles are vendored under tests/data/pdsm/profiles), IHE MHD 4.2.3 and the national sample
submission (ansforge/DRIM-M_DATA).
"""

import base64
import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.publication.confidentiality import Confidentiality
from gateway.publication.event_codes import EventCode
from gateway.publication.kos import Manifest
from storage.uids import oid_of, uid_from_digest

PDSM = "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/"
MHD = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/"
NOS = "https://mos.esante.gouv.fr/NOS/"
URI = "urn:ietf:rfc:3986"
FR_CORE_0203 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
# ISO 21090 EN.representation on HumanName: which PN component group a name is (PS3.5 6.2.1).
NAME_REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
CONFIDENTIALITY_SYSTEMS = (f"{NOS}TRE_A08-HL7Confidentiality/FHIR/TRE-A08-HL7Confidentiality",
                           "http://terminology.hl7.org/CodeSystem/v3-Confidentiality")
MASKING_SYSTEM = f"{NOS}TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
CATEGORY = {"system": f"{NOS}TRE_A03-ClasseDocument/FHIR/TRE-A03-ClasseDocument",
            "code": "31", "display": "Imagerie médicale"}
TYPE = {"system": f"{NOS}TRE_A05-TypeDocComplementaire/FHIR/TRE-A05-TypeDocComplementaire",
        "code": "IMG-KOS", "display": "Reference d'objets d'un examen d'imagerie"}
FORMAT = {"system": f"{NOS}TRE_A09-DICOMuidRegistry/FHIR/TRE-A09-DICOMuidRegistry",
          "code": "1.2.840.10008.5.1.4.1.1.88.59",
          "display": "Document Références d'objets d'un examen d'imagerie selon profil IHE RAD "
                     "XDS-I"}
REFERENCE_ID_TYPES = {"accession": "urn:ihe:iti:xds:2013:accession",
                      "study": "urn:ihe:iti:xds:2016:studyInstanceUID",
                      "order": "urn:ihe:iti:xds:2013:order"}
# INS assigning authorities (ANS; hl7.fhir.fr.core fr-core-patient-ins): identifier type per OID.
INS_TYPES = {"1.2.250.1.213.1.4.8": "INS-NIR", "1.2.250.1.213.1.4.9": "INS-NIA",
             "1.2.250.1.213.1.4.10": "INS-NIR-TEST", "1.2.250.1.213.1.4.11": "INS-NIR-DEMO"}
TITLE = "Reference d'objets d'un examen d'imagerie"
_GENDERS = {"M": "male", "F": "female", "O": "other"}


class MetadataError(ValueError):
    """The study lacks something the registry requires (said in the message)."""


@dataclass(frozen=True)
class Producer:
    """Who publishes: the institution-level metadata of every manifest (from the settings,
    which hold the defaults)."""

    gateway_oid: str
    organization_name: str
    organization_finess: str  # empty = name only
    facility_type: str  # TRE_R02
    practice_setting: str  # TRE_A01
    designation_type: str  # TRE_R209
    authenticator_idnps: str  # empty = no authenticator
    authenticator_name: str


def security_labels(confidentiality: Confidentiality) -> list[dict]:
    """``DocumentReference.securityLabel``: the level in TRE_A08 and HL7 v3 (one concept,
    which satisfies both the PDSm 3.1.1 and the CI build bindings), then each masking code."""
    level = {"coding": [{"system": system, "code": confidentiality.level}
                        for system in CONFIDENTIALITY_SYSTEMS]}
    return [level, *({"coding": [{"system": MASKING_SYSTEM, "code": code}]}
                     for code in confidentiality.masking)]


def status_patch(status: str) -> list[dict]:
    """JSON Patch (RFC 6902) setting the document status (flux 3: PDSm 3.1.1, metadata update
    by PATCH; only status, securityLabel and isArchived may change)."""
    return [{"op": "replace", "path": "/status", "value": status}]


def security_label_patch(confidentiality: Confidentiality) -> list[dict]:
    """JSON Patch replacing the confidentiality and masking codes (flux 3)."""
    return [{"op": "replace", "path": "/securityLabel",
             "value": security_labels(confidentiality)}]


def kos_identifier(kos_uid: str) -> str:
    """The token of a manifest's masterIdentifier, for ITI-67 ``identifier=``."""
    return f"{URI}|urn:oid:{kos_uid}"


def document_id(response: dict) -> str:
    """``DocumentReference/<id>`` created by an ITI-65 request, from the transaction-response
    (entries answer in request order, ours is the second); "" when absent."""
    entries = response.get("entry") or []
    location = entries[1].get("response", {}).get("location", "") if len(entries) > 1 else ""
    match = re.search(r"DocumentReference/[^/]+", location)
    return match.group(0) if match else ""


def _identifier(system: str, value: str, code: str = "", use: str = "official",
                code_system: str = FR_CORE_0203) -> dict:
    identifier: dict = {"use": use}
    if code:
        identifier["type"] = {"coding": [{"system": code_system, "code": code}]}
    if system:
        identifier["system"] = system
    identifier["value"] = value
    return identifier


def _fhir_datetime(date: str, time: str) -> str:
    """A DICOM DA/TM pair as a FHIR dateTime in the gateway's time zone (DICOM times are
    local, PS3.5 6.2); a date alone stays a date."""
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return ""
    digits = re.sub(r"[^0-9]", "", time.split(".")[0])[:6]
    if not digits:
        return f"{date[:4]}-{date[4:6]}-{date[6:]}"
    digits = digits.ljust(6, "0")
    moment = datetime.strptime(date + digits, "%Y%m%d%H%M%S").astimezone()
    return moment.isoformat(timespec="seconds")


def _text(item: Dataset, keyword: str) -> str:
    value = item.get(keyword)
    return "" if value is None else str(value).strip()


def _issuer_oid(item: Dataset, keyword: str) -> str:
    """The OID of the first item of an HL7 v2 HD sequence (PS3.3 10.14): its ISO universal
    id, else a local namespace that is an OID; "" when none."""
    items = item.get(keyword) or []
    if not items:
        return ""
    universal = _text(items[0], "UniversalEntityID") \
        if _text(items[0], "UniversalEntityIDType") in ("", "ISO") else ""
    return oid_of(universal) or oid_of(_text(items[0], "LocalNamespaceEntityID"))


def _not_an_oid(item: Dataset, keyword: str) -> str:
    """The universal id of the first item of an HD sequence, with its type, when it is not
    an ISO OID (a DNS name, a URI...); "" otherwise."""
    items = item.get(keyword) or []
    universal = _text(items[0], "UniversalEntityID") if items else ""
    if not universal or _issuer_oid(item, keyword):
        return ""
    return f"{universal!r} ({_text(items[0], 'UniversalEntityIDType') or 'no type'})"


def _patient_identifiers(kos: Dataset) -> tuple[dict | None, dict]:
    """(INS identifier or None, local identifier {} when its issuer is unknown)."""
    ins = None
    for other in kos.get("OtherPatientIDsSequence") or []:
        oid = _issuer_oid(other, "IssuerOfPatientIDQualifiersSequence") or \
            oid_of(_text(other, "IssuerOfPatientID"))
        if oid in INS_TYPES and _text(other, "PatientID") and ins is None:
            ins = _identifier(f"urn:oid:{oid}", _text(other, "PatientID"), INS_TYPES[oid])
    issuer = _issuer_oid(kos, "IssuerOfPatientIDQualifiersSequence") or \
        oid_of(_text(kos, "IssuerOfPatientID"))
    patient_id = _text(kos, "PatientID")
    local = _identifier(f"urn:oid:{issuer}", patient_id, "PI", use="usual",
                        code_system="http://terminology.hl7.org/CodeSystem/v2-0203") \
        if issuer and patient_id else {}
    return ins, local


def _subject(ins: dict | None, local: dict) -> dict:
    """A logical reference by the national identifier (MHD 2:3.65.4.1.2.2), else the local."""
    chosen = ins or local
    return {"type": "Patient", "identifier": {"system": chosen["system"],
                                              "value": chosen["value"]}}


def _human_names(value: str) -> list[dict]:
    """FHIR HumanNames of a DICOM PN (PS3.5 6.2.1): the alphabetic component group is the
    official name; an ideographic or phonetic group is a name of its own, marked with its
    ISO 21090 representation (IDE, SYL). Components: family^given^middle^prefix^suffix."""
    names = []
    for group, representation in zip(value.split("="), ("ABC", "IDE", "SYL"), strict=False):
        family, given, middle, prefix, suffix = (group.split("^") + [""] * 5)[:5]
        name: dict = {}
        if representation == "ABC":
            name["use"] = "official"
        else:
            name["extension"] = [{"url": NAME_REPRESENTATION, "valueCode": representation}]
        if family.strip():
            name["family"] = family.strip()
        if given.strip() or middle.strip():
            name["given"] = [part.strip() for part in (given, middle) if part.strip()]
        if prefix.strip():
            name["prefix"] = [prefix.strip()]
        if suffix.strip():
            name["suffix"] = [suffix.strip()]
        if set(name) - {"use", "extension"}:
            names.append(name)
    return names


def _source_patient(kos: Dataset, ins: dict | None, local: dict) -> dict:
    patient: dict = {"resourceType": "Patient", "id": "patient",
                     "identifier": [i for i in (local, ins) if i]}
    names = _human_names(_text(kos, "PatientName"))
    if names:
        patient["name"] = names
    patient["gender"] = _GENDERS.get(_text(kos, "PatientSex").upper(), "unknown")
    birth = _text(kos, "PatientBirthDate")
    if len(birth) == 8 and birth.isdigit():
        patient["birthDate"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    return patient


def _organization(producer: Producer) -> dict:
    organization: dict = {"resourceType": "Organization", "id": "organization"}
    if producer.organization_finess:
        organization["identifier"] = [
            _identifier("urn:oid:1.2.250.1.71.4.2.2", f"1{producer.organization_finess}",
                        "IDNST"),
            _identifier("https://finess.esante.gouv.fr", producer.organization_finess,
                        "FINEG")]
    organization["name"] = producer.organization_name
    return organization


def _device(producer: Producer) -> dict:
    return {"resourceType": "Device", "id": "device",
            "identifier": [{"system": URI, "value": f"urn:oid:{producer.gateway_oid}"}],
            "deviceName": [{"name": "Passerelle (DRIMbox Source)",
                            "type": "user-friendly-name"}],
            "owner": {"reference": "#organization"}}


def _authenticator(producer: Producer) -> dict | None:
    if not producer.authenticator_idnps:
        return None
    family, _, given = producer.authenticator_name.partition("^")
    practitioner: dict = {"resourceType": "Practitioner", "id": "authenticator",
                          "identifier": [_identifier("urn:oid:1.2.250.1.71.4.2.1",
                                                     producer.authenticator_idnps, "IDNPS")]}
    if family:
        practitioner["name"] = [{"use": "official", "family": family,
                                 **({"given": [given]} if given else {})}]
    return practitioner


def _orders(kos: Dataset) -> list[tuple[str, str]]:
    """(placer order number, its assigning authority OID or "") of each distinct order of
    the manifest's Referenced Request Sequence."""
    orders: list[tuple[str, str]] = []
    for item in kos.get("ReferencedRequestSequence") or []:
        order = (_text(item, "PlacerOrderNumberImagingServiceRequest"),
                 _issuer_oid(item, "OrderPlacerIdentifierSequence"))
        if order[0] and order not in orders:
            orders.append(order)
    return orders


def orders_without_authority(manifest: Manifest) -> list[str]:
    """The placer order numbers of ``manifest`` that name no assigning authority: the
    bundle leaves them out of referenceIdList (the publisher warns about them)."""
    return [value for value, issuer in _orders(dcmread(BytesIO(manifest.data)))
            if not issuer]


def _related(kos: Dataset) -> list[dict]:
    """referenceIdList (PDSm 3.1.1, ``context.related`` slice referenceIdList): each
    distinct accession and placer order of the manifest with its assigning authority, and
    the study UID (the slice's system is absent only for the study UID: a bare number names
    nothing outside the RIS).

    Raises MetadataError for a study without an accession, or an accession without an
    authority: the registry links the manifest to its report by it (issue 15 finding 9). A
    placer order without an authority is left out instead: the accession already identifies
    the request, and an order number alone must not hold back the whole study."""

    def entry(kind: str, value: str, issuer: str) -> dict:
        identifier: dict = {"type": {"coding": [{"system": URI,
                                                 "code": REFERENCE_ID_TYPES[kind]}]}}
        if issuer:
            identifier["system"] = f"urn:oid:{issuer}"
        identifier["value"] = value
        return {"identifier": identifier}

    accessions: list[tuple[str, str]] = []
    for item in [kos, *(kos.get("ReferencedRequestSequence") or [])]:
        accession = (_text(item, "AccessionNumber"),
                     _issuer_oid(item, "IssuerOfAccessionNumberSequence"))
        if accession[0] and not accession[1]:
            _refuse_unscoped_accession(accession[0], item)
        if accession[0] and accession not in accessions:
            accessions.append(accession)
    if not accessions:
        raise MetadataError("the study has no Accession Number: the registry needs one to "
                            "link the manifest to its report (referenceIdList)")
    return [*(entry("accession", value, issuer) for value, issuer in accessions),
            entry("study", _text(kos, "StudyInstanceUID"), ""),
            *(entry("order", value, issuer) for value, issuer in _orders(kos) if issuer)]


def _refuse_unscoped_accession(accession: str, item: Dataset) -> None:
    """MetadataError for an accession number without an OID for its authority, saying what
    would give it one: the setting, or (when the instances name a non-OID universal issuer,
    which the setting does not override) the instances themselves."""
    named = _not_an_oid(item, "IssuerOfAccessionNumberSequence")
    if named:
        raise MetadataError(
            f"accession number {accession!r} is issued by {named}, not an ISO OID, which the "
            "registry needs (referenceIdList): the instances' Issuer of Accession Number "
            "Sequence must name its OID (accession_issuer_oid applies only where they name "
            "no universal issuer)")
    raise MetadataError(
        f"accession number {accession!r} has no assigning authority OID (none in the "
        "instances): set accession_issuer_oid")


def _period(kos: Dataset) -> dict:
    """context.period: the service start is the study's date and time (RAD TF-3
    4.68.4.1.2.4, serviceStartTime), never invented; PDSm makes it 1..1, so a study without
    Study Date cannot be published (MetadataError)."""
    start = _fhir_datetime(_text(kos, "StudyDate"), _text(kos, "StudyTime"))
    if not start:
        raise MetadataError("the study has no Study Date: the registry needs the service "
                            "start time (context.period.start)")
    return {"start": start}


def _concept(system: str, code: str, display: str = "", text: str = "") -> dict:
    coding = {"system": system, "code": code, **({"display": display} if display else {})}
    return {"coding": [coding], **({"text": text} if text else {})}


def _full_url(kos_uid: str, role: str) -> str:
    """A ``urn:uuid:`` stable for one manifest, so that a resent Bundle is the same Bundle."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, f'{kos_uid}/{role}')}"


def provide_document_bundle(manifest: Manifest, producer: Producer, events: list[EventCode],
                            confidentiality: Confidentiality, replaces: str = "",
                            now: datetime | None = None) -> dict:
    """The ITI-65 transaction Bundle publishing ``manifest`` (PDSm 3.1.1
    PDSm_ComprehensiveProvideDocumentBundle), its metadata read from the manifest; with
    ``replaces`` (``DocumentReference/<id>`` of the current version) it also supersedes that
    document (``relatesTo replaces`` and an IHE.MHD.Patch.Parameters entry). Raises
    MetadataError when the manifest lacks what the registry requires: a patient identifier
    with its authority, an accession number with its authority, a study date."""
    kos = dcmread(BytesIO(manifest.data))
    ins, local = _patient_identifiers(kos)
    if ins is None and not local:
        named = _not_an_oid(kos, "IssuerOfPatientIDQualifiersSequence")
        if named:  # the configured OID applies only where the instances name no authority
            raise MetadataError(
                f"patient {_text(kos, 'PatientID')!r} has no INS, and the instances name its "
                f"assigning authority {named}, not an ISO OID, which the registry needs: "
                "the instances' Issuer of Patient ID Qualifiers Sequence must name its OID "
                "(patient_id_issuer_oid applies only where they name no universal issuer)")
        raise MetadataError(
            f"patient {_text(kos, 'PatientID')!r} has no INS and no assigning authority OID "
            "(IssuerOfPatientID is not an OID): set patient_id_issuer_oid")
    related, period = _related(kos), _period(kos)
    submitted = (now or datetime.now()).astimezone().isoformat(timespec="seconds")
    list_url, document_url, binary_url = (_full_url(manifest.sop_uid, role)
                                          for role in ("list", "document", "binary"))
    subject = _subject(ins, local)
    description = _text(kos, "StudyDescription")
    title = f"{TITLE} - {description}" if description else TITLE
    authenticator = _authenticator(producer)
    submission_uid = uid_from_digest(hashlib.sha256(
        f"submission\n{manifest.sop_uid}\n{replaces}".encode()).digest())
    submission_set = {
        "resourceType": "List",
        "meta": {"profile": [f"{PDSM}pdsm-submissionset-comprehensive"]},
        "contained": [_device(producer), _organization(producer)],
        "extension": [
            {"url": f"{MHD}ihe-designationType", "valueCodeableConcept": _concept(
                f"{NOS}TRE_R209-TypeActivite/FHIR/TRE-R209-TypeActivite",
                producer.designation_type)},
            {"url": f"{MHD}ihe-sourceId",
             "valueIdentifier": {"system": URI, "value": f"urn:oid:{producer.gateway_oid}"}}],
        "identifier": [{"use": "usual", "system": URI, "value": f"urn:oid:{submission_uid}"},
                       {"use": "official", "system": URI, "value": list_url}],
        "status": "current",
        "mode": "working",
        "title": title,
        "code": _concept("https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes",
                         "submissionset", "SubmissionSet as a FHIR List"),
        "subject": subject,
        "date": submitted,
        "source": {"extension": [{"url": f"{MHD}ihe-authorOrg",
                                  "valueReference": {"reference": "#organization"}}],
                   "reference": "#device"},
        "entry": [{"item": {"reference": document_url}}],
    }
    document = {
        "resourceType": "DocumentReference",
        "meta": {"profile": [f"{PDSM}pdsm-comprehensive-document-reference"]},
        "contained": [_organization(producer), _device(producer),
                      _source_patient(kos, ins, local),
                      *([authenticator] if authenticator else [])],
        "masterIdentifier": {"use": "usual", "system": URI,
                             "value": f"urn:oid:{manifest.sop_uid}"},
        "identifier": [{"use": "official", "system": URI, "value": document_url}],
        "status": "current",
        "type": {"coding": [TYPE]},
        "category": [{"coding": [CATEGORY]}],
        "subject": subject,
        "date": submitted,
        "author": [{"reference": "#device"}],
        **({"authenticator": {"reference": "#authenticator"}} if authenticator else {}),
        "custodian": {"reference": "#organization"},
        **({"relatesTo": [{"code": "replaces", "target": {"reference": replaces}}]}
           if replaces else {}),
        "securityLabel": security_labels(confidentiality),
        "content": [{
            "attachment": {
                "contentType": "application/dicom",
                "language": "fr-FR",
                "url": binary_url,
                "size": len(manifest.data),
                "hash": base64.b64encode(hashlib.sha1(manifest.data).digest()).decode(),
                "title": title,
                "creation": _fhir_datetime(_text(kos, "ContentDate"),
                                           _text(kos, "ContentTime")),
            },
            "format": FORMAT,
        }],
        "context": {
            "event": [_concept(e.system, e.code, text=e.text) for e in events],
            "period": period,
            "facilityType": _concept(
                f"{NOS}TRE_R02-SecteurActivite/FHIR/TRE-R02-SecteurActivite",
                producer.facility_type),
            "practiceSetting": _concept(
                f"{NOS}TRE_A01-CadreExercice/FHIR/TRE-A01-CadreExercice",
                producer.practice_setting),
            "sourcePatientInfo": {"reference": "#patient"},
            "related": related,
        },
    }
    if not document["context"]["event"]:
        del document["context"]["event"]
    entries = [
        {"fullUrl": list_url, "resource": submission_set,
         "request": {"method": "POST", "url": "List"}},
        {"fullUrl": document_url, "resource": document,
         "request": {"method": "POST", "url": "DocumentReference"}},
        {"fullUrl": binary_url,
         "resource": {"resourceType": "Binary", "contentType": "application/dicom",
                      "data": base64.b64encode(manifest.data).decode()},
         "request": {"method": "POST", "url": "Binary"}},
    ]
    if replaces:
        entries.append({
            "resource": {"resourceType": "Parameters",
                         "meta": {"profile": [f"{MHD}IHE.MHD.Patch.Parameters"]},
                         "parameter": [{"name": "operation", "part": [
                             {"name": "type", "valueCode": "replace"},
                             {"name": "path", "valueString": "DocumentReference.status"},
                             {"name": "value", "valueCode": "superseded"}]}]},
            "request": {"method": "PATCH", "url": replaces}})
    return {"resourceType": "Bundle",
            "meta": {"profile": [f"{PDSM}pdsm-comprehensive-provide-document-bundle"]},
            "type": "transaction", "timestamp": submitted, "entry": entries}
