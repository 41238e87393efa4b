"""Checks of an ITI-65 Provide Document Bundle against the PDSm / MHD rules a KOS
publication must meet (PDSm IG 3.1.1 ITI-65 page and its Bundle, SubmissionSet and
DocumentReference profiles; MHD 4.2.3 ITI-65), with the registry's own constants
(``gateway.registry.pdsm``).

Structure only where FHIR itself requires it; the profile rules are what matters here: the
ones a document registry would reject, each reported with the rule it breaks.
"""

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from gateway.registry import pdsm

_OID = re.compile(r"urn:oid:[0-9]+(\.[0-9]+)+")
_UUID = re.compile(r"urn:uuid:[0-9a-fA-F-]{36}")


@dataclass(frozen=True, slots=True)
class Issue:
    """One finding, as an OperationOutcome issue: ``code`` is the FHIR issue type, ``details``
    the XDS error code or rule name (ITI TF-3 Table 4.2.4.1-2 where one fits)."""

    code: str
    details: str
    diagnostics: str
    expression: str
    severity: str = "error"

    def as_fhir(self) -> dict:
        """The OperationOutcome.issue element."""
        return {"severity": self.severity, "code": self.code, "details": {"text": self.details},
                "diagnostics": self.diagnostics, "expression": [self.expression]}


class _Checker:
    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def fail(self, where: str, rule: str, why: str, code: str = "invalid") -> None:
        self.issues.append(Issue(code, rule, why, where))

    def warn(self, where: str, rule: str, why: str) -> None:
        self.issues.append(Issue("business-rule", rule, why, where, "warning"))

    def require(self, resource: dict, path: str, where: str) -> object:
        """The value at dotted ``path`` of ``resource``; an issue when missing or empty."""
        value: object = resource
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value in (None, "", [], {}):
            self.fail(f"{where}.{path}", "XDSRegistryMetadataError", f"{path} is required",
                      "required")
        return value


def _contained_ids(resource: dict) -> set[str]:
    return {f"#{c.get('id')}" for c in resource.get("contained", []) if isinstance(c, dict)}


def _check_contained_reference(check: _Checker, resource: dict, reference: object,
                               where: str) -> None:
    """MHD comprehensive: author, authenticator, source, sourcePatientInfo are contained."""
    target = reference.get("reference") if isinstance(reference, dict) else None
    if target is not None and target not in _contained_ids(resource):
        check.fail(where, "ContainedReference",
                   f"{target!r} must reference a resource contained in this resource")


def _extension(resource: dict, url: str) -> list[dict]:
    return [e for e in resource.get("extension", []) if e.get("url") == url]


def _check_submission_set(check: _Checker, entry: dict, where: str, documents: set[str]) -> None:
    ss = entry["resource"]
    if not ss.get("contained"):
        check.fail(f"{where}.contained", "XDSRegistryMetadataError",
                   "the SubmissionSet author (source) must be contained", "required")
    for url, kind in ((pdsm.DESIGNATION_TYPE, "valueCodeableConcept"),
                      (pdsm.SOURCE_ID, "valueIdentifier")):
        found = _extension(ss, url)
        if len(found) != 1 or kind not in found[0]:
            check.fail(f"{where}.extension", "XDSRegistryMetadataError",
                       f"exactly one {url} extension with {kind} is required", "required")
        elif url == pdsm.SOURCE_ID and not _OID.fullmatch(found[0][kind].get("value", "")):
            check.fail(f"{where}.extension", "XDSRegistryMetadataError",
                       "sourceId must be an OID written urn:oid:...", "value")
    unique = [i for i in ss.get("identifier", []) if i.get("use") == "usual"]
    if len(unique) != 1:  # 0..1 in PDSm, required here as by the XDS registry behind it
        check.fail(f"{where}.identifier", "XDSRegistryMetadataError",
                   "one uniqueId (identifier with use usual) is required", "required")
    elif unique[0].get("system") != pdsm.URI or not _OID.fullmatch(unique[0].get("value", "")):
        check.fail(f"{where}.identifier", "mhd-startswithoid",
                   f"the uniqueId has system {pdsm.URI} and a urn:oid:... value", "value")
    if (ss.get("status"), ss.get("mode")) != (pdsm.SUBMISSION_SET_STATUS,
                                              pdsm.SUBMISSION_SET_MODE):
        check.fail(f"{where}.status", "XDSRegistryMetadataError",
                   f"SubmissionSet status must be {pdsm.SUBMISSION_SET_STATUS} and mode "
                   f"{pdsm.SUBMISSION_SET_MODE}", "value")
    codes = [c for c in (ss.get("code") or {}).get("coding", [])
             if (c.get("system"), c.get("code")) == (pdsm.LIST_TYPES, pdsm.SUBMISSION_SET_CODE)]
    if not codes:
        check.fail(f"{where}.code", "XDSRegistryMetadataError",
                   f"code must be {pdsm.LIST_TYPES}#{pdsm.SUBMISSION_SET_CODE}", "value")
    elif any(c.get("display", pdsm.SUBMISSION_SET_DISPLAY) != pdsm.SUBMISSION_SET_DISPLAY
             for c in codes):
        check.fail(f"{where}.code", "XDSRegistryMetadataError",
                   f"the display of {pdsm.SUBMISSION_SET_CODE} is "
                   f"{pdsm.SUBMISSION_SET_DISPLAY!r}", "value")
    for path in ("subject", "date", "source"):
        check.require(ss, path, where)
    _check_contained_reference(check, ss, ss.get("source"), f"{where}.source")
    for n, item in enumerate(ss.get("entry", [])):
        target = (item.get("item") or {}).get("reference")
        if target not in documents:
            check.fail(f"{where}.entry[{n}].item", "XDSRegistryMetadataError",
                       f"{target!r} is not a DocumentReference of this Bundle", "not-found")


def patient_key(subject: object) -> tuple[str, str] | None:
    """(system, value) of a reference to a patient by identifier: logical
    (``identifier``, MHD 2:3.65.4.1.2.2) or conditional (``Patient?identifier=s|v``)."""
    if not isinstance(subject, dict):
        return None
    identifier = subject.get("identifier")
    if isinstance(identifier, dict):
        return identifier.get("system", ""), identifier.get("value", "")
    reference = str(subject.get("reference", ""))
    if reference.startswith("Patient?identifier=") and "|" in reference:
        system, _, value = reference.removeprefix("Patient?identifier=").partition("|")
        return system, value
    return None


def _decoded(binary: dict) -> bytes | None:
    try:
        return base64.b64decode(binary.get("data", ""), validate=True)
    except (binascii.Error, ValueError):
        return None


def _codings(concept: object) -> list[dict]:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return [c for c in codings if isinstance(c, dict)] if isinstance(codings, list) else []


def _has_coding(concept: object, system_code: tuple[str, str]) -> bool:
    return any((c.get("system"), c.get("code")) == system_code for c in _codings(concept))


def _is_kos(doc: dict) -> bool:
    """A KOS manifest by its type (IMG-KOS) or its format (the KOS SOP Class UID, in any
    code system): either is enough for the KOS rules to apply to the rest."""
    formats = [(content.get("format") or {}).get("code", "") for content in
               doc.get("content") or [] if isinstance(content, dict)]
    return any(c.get("code") == pdsm.KOS_TYPE[1] for c in _codings(doc.get("type"))) or \
        any(str(code).endswith(pdsm.KOS_SOP_CLASS) for code in formats)


def _check_kos_codes(check: _Checker, doc: dict, where: str) -> None:
    """Class, type, format and media type of a KOS (CI-SIS; TRE_A03, TRE_A05, TRE_A09)."""
    if not _has_coding(doc.get("type"), pdsm.KOS_TYPE):
        check.fail(f"{where}.type", "XDSRegistryMetadataError",
                   f"a KOS has type {'|'.join(pdsm.KOS_TYPE)}", "value")
    if not any(_has_coding(c, pdsm.KOS_CATEGORY) for c in doc.get("category") or []):
        check.fail(f"{where}.category", "XDSRegistryMetadataError",
                   f"a KOS has category {'|'.join(pdsm.KOS_CATEGORY)}", "value")
    for n, content in enumerate(doc.get("content") or []):
        if not isinstance(content, dict):
            continue
        concept = content.get("format") or {}
        if (concept.get("system"), concept.get("code")) != pdsm.KOS_FORMAT:
            check.fail(f"{where}.content[{n}].format", "XDSRegistryMetadataError",
                       f"a KOS has format {'|'.join(pdsm.KOS_FORMAT)}", "value")
        if (content.get("attachment") or {}).get("contentType") != pdsm.DICOM_MEDIA_TYPE:
            check.fail(f"{where}.content[{n}].attachment.contentType",
                       "XDSRegistryMetadataError", f"a KOS is {pdsm.DICOM_MEDIA_TYPE}", "value")


def _check_security_labels(check: _Checker, doc: dict, where: str) -> None:
    """JDV_J08: the confidentiality level (N, R, V) and only known codes of known systems."""
    codings = [c for label in doc.get("securityLabel") or [] for c in _codings(label)]
    known = {**pdsm.CONFIDENTIALITY, **pdsm.VISIBILITY}
    for coding in codings:
        codes = known.get(coding.get("system", ""))
        if codes is not None and coding.get("code") not in codes:
            check.fail(f"{where}.securityLabel", "ConfidentialityCode",
                       f"{coding.get('code')!r} is not a code of {coding.get('system')}",
                       "code-invalid")
    if not any(coding.get("code") in pdsm.CONFIDENTIALITY.get(coding.get("system", ""), ())
               for coding in codings):
        check.fail(f"{where}.securityLabel", "ConfidentialityCode",
                   "securityLabel needs the confidentiality level (N, R or V) in "
                   f"{' or '.join(pdsm.CONFIDENTIALITY)}", "required")


def _check_content(check: _Checker, doc: dict, where: str, binaries: dict[str, dict]) -> None:
    content = doc.get("content") or []
    if len(content) != 1:
        check.fail(f"{where}.content", "XDSRegistryMetadataError",
                   "exactly one content is required", "required")
        return
    attachment = content[0].get("attachment") or {}
    for name in ("contentType", "language", "url", "size", "hash", "title", "creation"):
        check.require(attachment, name, f"{where}.content[0].attachment")
    check.require(content[0], "format", f"{where}.content[0]")
    binary = binaries.get(attachment.get("url", ""))
    if binary is None:
        check.fail(f"{where}.content[0].attachment.url", "XDSMissingDocument",
                   "attachment.url must be the fullUrl of a Binary in this Bundle", "not-found")
        return
    data = _decoded(binary)
    if data is None:
        check.fail(f"{where}.content[0].attachment.url", "XDSRegistryMetadataError",
                   "Binary.data is not base64", "invalid")
        return
    if binary.get("contentType") != attachment.get("contentType"):
        check.fail(f"{where}.content[0].attachment.contentType", "XDSRegistryMetadataError",
                   "attachment.contentType differs from the Binary's", "value")
    if attachment.get("size") != len(data):
        check.fail(f"{where}.content[0].attachment.size", "XDSNonIdenticalSize",
                   f"size {attachment.get('size')} but the Binary has {len(data)} bytes",
                   "value")
    if attachment.get("hash") != base64.b64encode(hashlib.sha1(data).digest()).decode():
        check.fail(f"{where}.content[0].attachment.hash", "XDSNonIdenticalHash",
                   "hash is not the base64 SHA-1 of the Binary's bytes", "value")


def _check_imaging_context(check: _Checker, doc: dict, where: str) -> None:
    """The CI-SIS imaging volet: modality events and the referenceIdList of a KOS."""
    context = doc.get("context") or {}
    systems = [c.get("system") for e in context.get("event", []) for c in _codings(e)]
    if pdsm.DCM not in systems:
        check.fail(f"{where}.context.event", "ImagingModalityCode",
                   f"a KOS needs its acquisition modalities as event codes ({pdsm.DCM})",
                   "required")
    if pdsm.SNOMED not in systems:
        check.warn(f"{where}.context.event", "ImagingRegionCode",
                   "no anatomic region code (SNOMED CT, JDV_RegionAnatomique-CISIS)")
    kinds = set()
    for n, related in enumerate(context.get("related", [])):
        identifier = related.get("identifier") or {}
        codes = {c.get("code") for c in _codings(identifier.get("type"))
                 if c.get("system") == pdsm.URI}
        kinds |= codes
        # CXi.4: an accession or order number is scoped by its assigning authority; the
        # referenceIdList slice leaves the system out only for the study UID.
        if codes & pdsm.SCOPED_REFERENCE_IDS and not _OID.fullmatch(
                str(identifier.get("system", ""))):
            check.fail(f"{where}.context.related[{n}].identifier.system", "ReferenceIdList",
                       f"{identifier.get('value', '')!r} ({', '.join(sorted(codes))}) needs "
                       "its assigning authority as system urn:oid:...", "required")
    for kind in (pdsm.ACCESSION, pdsm.STUDY_INSTANCE_UID):
        if kind not in kinds:
            check.fail(f"{where}.context.related", "ReferenceIdList",
                       f"referenceIdList lacks the {pdsm.URI}#{kind} entry", "required")


def _check_document(check: _Checker, entry: dict, where: str, binaries: dict[str, dict],
                    subject: tuple[str, str] | None) -> None:
    doc = entry["resource"]
    master = doc.get("masterIdentifier") or {}
    if master.get("use") != "usual" or master.get("system") != pdsm.URI \
            or not _OID.fullmatch(master.get("value", "")):
        check.fail(f"{where}.masterIdentifier", "mhd-startswithoid",
                   f"masterIdentifier must be use usual, system {pdsm.URI}, "
                   "value urn:oid:<uniqueId>", "value")
    if doc.get("status") != "current":
        check.fail(f"{where}.status", "XDSRegistryMetadataError",
                   "a new document must be current", "value")
    for path in ("type", "category", "subject", "date", "author", "custodian",
                 "securityLabel", "context.period.start", "context.facilityType",
                 "context.practiceSetting", "context.sourcePatientInfo"):
        check.require(doc, path, where)
    key = patient_key(doc.get("subject"))
    if key is None or not all(key):
        check.fail(f"{where}.subject", "XDSUnknownPatientId",
                   "subject must identify the patient (identifier system and value)", "required")
    elif subject is not None and key != subject:
        check.fail(f"{where}.subject", "XDSPatientIdDoesNotMatch",
                   "the DocumentReference and the SubmissionSet name different patients",
                   "value")
    references = [*(doc.get("author") or []), doc.get("authenticator"),
                  (doc.get("context") or {}).get("sourcePatientInfo")]
    for n, reference in enumerate(references):
        _check_contained_reference(check, doc, reference, f"{where}.reference[{n}]")
    if doc.get("securityLabel"):
        _check_security_labels(check, doc, where)
    if _is_kos(doc):
        _check_kos_codes(check, doc, where)
        _check_imaging_context(check, doc, where)
    _check_content(check, doc, where, binaries)


def _check_patch(check: _Checker, entry: dict, where: str) -> None:
    parameters = entry["resource"]
    parts = {p.get("name"): p for op in parameters.get("parameter", [])
             for p in op.get("part", [])}
    if not str(entry["request"].get("url", "")).startswith("DocumentReference/") \
            or parts.get("type", {}).get("valueCode") != "replace" \
            or parts.get("path", {}).get("valueString") != pdsm.SUPERSEDE_PATH \
            or parts.get("value", {}).get("valueCode") != "superseded":
        check.fail(where, "UpdateDocumentRefs",
                   "a PATCH entry must set DocumentReference/<id> status to superseded "
                   "(IHE.MHD.Patch.Parameters)", "value")


def check_provide_bundle(bundle: object) -> list[Issue]:
    """Every issue of an ITI-65 Bundle; errors make it non-conformant, warnings do not."""
    check = _Checker()
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" \
            or bundle.get("type") != "transaction":
        check.fail("Bundle", "XDSRegistryMetadataError", "expected a transaction Bundle",
                   "structure")
        return check.issues
    if pdsm.BUNDLE_PROFILE not in ((bundle.get("meta") or {}).get("profile") or []):
        check.fail("Bundle.meta.profile", "XDSRegistryMetadataError",
                   f"Bundle.meta.profile must name {pdsm.BUNDLE_PROFILE}", "value")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and
                                                isinstance(e.get("resource"), dict) and
                                                isinstance(e.get("request"), dict)
                                                for e in entries):
        check.fail("Bundle.entry", "XDSRegistryMetadataError",
                   "every entry needs a resource and a request", "structure")
        return check.issues
    by_type: dict[str, list[tuple[int, dict]]] = {}
    for n, entry in enumerate(entries):
        kind = entry["resource"].get("resourceType", "")
        by_type.setdefault(kind, []).append((n, entry))
        method = entry["request"].get("method")
        if method == "POST" and (entry["request"].get("url") != kind
                                 or not _UUID.fullmatch(entry.get("fullUrl", ""))):
            check.fail(f"Bundle.entry[{n}]", "XDSRegistryMetadataError",
                       "a POST entry needs request.url = its resource type and a urn:uuid "
                       "fullUrl", "value")
        elif method not in ("POST", "PATCH") or (method == "PATCH") != (kind == "Parameters"):
            check.fail(f"Bundle.entry[{n}].request", "XDSRegistryMetadataError",
                       f"{kind} {method} is not part of an ITI-65 Bundle", "not-supported")
    lists = by_type.get("List", [])
    documents = by_type.get("DocumentReference", [])
    if len(lists) != 1:
        check.fail("Bundle.entry", "XDSRegistryMetadataError",
                   "exactly one SubmissionSet (List) is required", "required")
    if not documents:
        check.fail("Bundle.entry", "XDSRegistryMetadataError",
                   "at least one DocumentReference is required", "required")
    binaries = {e.get("fullUrl", ""): e["resource"] for _, e in by_type.get("Binary", [])}
    subject = patient_key(lists[0][1]["resource"].get("subject")) if lists else None
    for n, entry in lists:
        _check_submission_set(check, entry, f"Bundle.entry[{n}].resource",
                              {e.get("fullUrl") for _, e in documents})
    for n, entry in documents:
        _check_document(check, entry, f"Bundle.entry[{n}].resource", binaries, subject)
    for n, entry in by_type.get("Parameters", []):
        _check_patch(check, entry, f"Bundle.entry[{n}]")
    return check.issues
