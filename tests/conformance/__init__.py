"""Independent checks of what Passerelle publishes: the KOS by dicom3tools
(``dicom3tools``), the ITI-65 resources by the vendored PDSm StructureDefinitions
(``profiles``), the metadata against its own KOS (``consistency``); ``registry`` applies all
of them to what a local registry received. Nothing here imports the code under test.

In-process tests call ``assert_bundle_conformant`` / ``assert_kos_conformant``; every
``tests.processes.RegistryProcess`` runs ``registry_problems`` when it stops.
"""

import base64
from collections.abc import Sequence
from pathlib import Path

from tests.conformance.consistency import metadata_problems
from tests.conformance.dicom3tools import kos_problems
from tests.conformance.profiles import Checker, vendored

PDSM = "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/"
BUNDLE_PROFILE = f"{PDSM}pdsm-comprehensive-provide-document-bundle"
DOCUMENT_PROFILE = f"{PDSM}pdsm-comprehensive-document-reference"
SUBMISSION_SET_PROFILE = f"{PDSM}pdsm-submissionset-comprehensive"
DICOM = "application/dicom"


def profile_problems(resource: dict, profile: str) -> list[str]:
    """The rules of a vendored PDSm profile that ``resource`` breaks, once each."""
    return list(dict.fromkeys(str(p) for p in Checker(vendored()).check(resource, profile)))


def bundle_problems(bundle: dict, instances: Sequence[Path] = ()) -> list[str]:
    """Every problem of an ITI-65 Bundle: the PDSm bundle profile (and, through its entry
    slices, the SubmissionSet and DocumentReference profiles), then each KOS it carries by
    dicom3tools (with ``instances``, its referenced instance files) and against its
    metadata."""
    problems = [f"profile: {p}" for p in profile_problems(bundle, BUNDLE_PROFILE)]
    entries = bundle.get("entry") or []
    binaries = {e.get("fullUrl"): e["resource"] for e in entries
                if (e.get("resource") or {}).get("resourceType") == "Binary"}
    lists = [e["resource"] for e in entries
             if (e.get("resource") or {}).get("resourceType") == "List"]
    for entry in entries:
        document = entry.get("resource") or {}
        if document.get("resourceType") != "DocumentReference":
            continue
        for content in document.get("content") or []:
            binary = binaries.get((content.get("attachment") or {}).get("url"))
            if binary is None or binary.get("contentType") != DICOM:
                continue
            data = base64.b64decode(binary["data"])
            problems += kos_problems(data, instances)
            problems += [f"metadata vs KOS: {p}" for p in
                         metadata_problems(document, data, lists[0] if lists else None,
                                           instances)]
    return problems


def assert_bundle_conformant(bundle: dict, instances: Sequence[Path] = ()) -> None:
    """Fail with every problem of ``bundle`` (see ``bundle_problems``), one per line."""
    problems = bundle_problems(bundle, instances)
    assert not problems, "the ITI-65 Bundle is not conformant:\n  " + "\n  ".join(problems)


def assert_kos_conformant(kos: bytes, instances: Sequence[Path] = ()) -> None:
    """Fail with every dicom3tools problem of a KOS (and of it with its instances)."""
    problems = kos_problems(kos, instances)
    assert not problems, "the KOS is not conformant:\n  " + "\n  ".join(problems)
