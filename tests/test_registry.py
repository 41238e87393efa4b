"""The local registry (``passerelle registry``): over HTTP, a KOS bundle is accepted and found
again (ITI-67, ITI-68), non-conformant bundles are refused with the rule they break, flux 3
patches change only what PDSm lets them change; in process, its validator against inputs
that do not come from Passerelle's bundle builder: the official PDSm examples (refused for
their known defects, accepted once those are fixed) and the elements the official PDSm
profiles make mandatory."""

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.registry import pdsm
from gateway.registry.validate import check_provide_bundle
from tests.pdsm_profiles import DOCUMENT_REFERENCE, SUBMISSION_SET, elements, mandatory, remove
from tests.processes import RegistryProcess

DATA = Path(__file__).parent / "data"
# Ours, hand-written (see tests/data/README.md): a CT KOS with its registry metadata.
EXAMPLE = json.loads((DATA / "fixtures" / "iti65-kos-bundle.json").read_text(encoding="utf-8"))
INS = "urn:oid:1.2.250.1.213.1.4.10|279035121518989"
KOS_UID = "urn:ietf:rfc:3986|urn:oid:2.25.26500313029186373620247222399085905270"
FHIR = {"Content-Type": "application/fhir+json"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    with RegistryProcess(tmp_path_factory.mktemp("registry") / "data") as process:
        yield process


@pytest.fixture(scope="module")
def published(registry: RegistryProcess) -> dict:
    response = httpx.post(registry.fhir_url, json=EXAMPLE, headers=FHIR)
    assert response.status_code == 200, response.text
    return response.json()


def _search(registry: RegistryProcess, params: dict[str, str]) -> dict:
    response = httpx.get(f"{registry.fhir_url}/DocumentReference", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_kos_bundle_is_accepted(published: dict) -> None:
    assert published["type"] == "transaction-response"
    assert [e["response"]["status"] for e in published["entry"]] == ["201 Created"] * 3
    assert published["entry"][1]["response"]["location"].startswith("DocumentReference/")


def test_iti67_finds_it_by_patient_accession_study_and_uid(registry: RegistryProcess,
                                                           published: dict) -> None:
    for params in ({"patient.identifier": INS, "status": "current"},
                   {"patient.identifier": INS, "status": "current",
                    "related:identifier": "urn:oid:1.2.250.1.999.1.1.2|ACC-2026-000457"},
                   {"patient.identifier": INS, "status": "current",
                    "related:identifier": "2.25.321956988244104548444153888899227130383"},
                   {"patient.identifier": INS, "status": "current",
                    "event": "http://dicom.nema.org/resources/ontology/DCM|CT"},
                   {"identifier": KOS_UID}):
        assert _search(registry, params)["total"] == 1, params
    assert _search(registry, {"patient.identifier": INS, "status": "current",
                              "related:identifier": "urn:oid:1.2.250.1.999.1.1.2|OTHER"}
                   )["total"] == 0


def test_iti68_returns_the_kos_bytes(registry: RegistryProcess, published: dict) -> None:
    document = _search(registry, {"identifier": KOS_UID})["entry"][0]["resource"]
    url = document["content"][0]["attachment"]["url"]
    assert url.startswith(registry.fhir_url + "/Binary/")
    raw = httpx.get(url, headers={"Accept": "application/dicom"})
    assert raw.headers["content-type"] == "application/dicom"
    assert raw.content == base64.b64decode(EXAMPLE["entry"][2]["resource"]["data"])
    as_fhir = httpx.get(url, headers={"Accept": "application/fhir+json"}).json()
    assert as_fhir["resourceType"] == "Binary" and base64.b64decode(as_fhir["data"]) == raw.content


def test_the_same_uniqueid_twice_is_a_duplicate(registry: RegistryProcess, published: dict) -> None:
    again = httpx.post(registry.fhir_url, json=EXAMPLE, headers=FHIR)
    assert again.status_code == 409
    assert again.json()["issue"][0]["details"]["text"] == "XDSDuplicateUniqueIdInRegistry"


def _mutated(change: object) -> dict:
    bundle = copy.deepcopy(EXAMPLE)
    document = bundle["entry"][1]["resource"]
    document["masterIdentifier"]["value"] = "urn:oid:2.25.1234"
    change(bundle, document)  # type: ignore[operator]
    return bundle


MUTATIONS = {
    "missing patient": (lambda b, d: d.pop("subject"), "XDSUnknownPatientId"),
    "other patient": (lambda b, d: d["subject"]["identifier"].update(value="1"),
                      "XDSPatientIdDoesNotMatch"),
    "no accession": (lambda b, d: d["context"]["related"].pop(0), "ReferenceIdList"),
    "no study uid": (lambda b, d: d["context"]["related"].pop(1), "ReferenceIdList"),
    "accession without authority": (
        lambda b, d: d["context"]["related"][0]["identifier"].pop("system"), "ReferenceIdList"),
    "order without authority": (
        lambda b, d: d["context"]["related"][2]["identifier"].pop("system"), "ReferenceIdList"),
    "no modality": (lambda b, d: d["context"].pop("event"), "ImagingModalityCode"),
    "wrong format": (lambda b, d: d["content"][0]["format"].update(code="urn:ihe:rad:PDF"),
                     "XDSRegistryMetadataError"),
    "wrong size": (lambda b, d: d["content"][0]["attachment"].update(size=1),
                   "XDSNonIdenticalSize"),
    "wrong hash": (lambda b, d: d["content"][0]["attachment"].update(hash="AAAA"),
                   "XDSNonIdenticalHash"),
    "binary absent": (lambda b, d: b["entry"].pop(2), "XDSMissingDocument"),
    "uuid uniqueId": (lambda b, d: d["masterIdentifier"].update(value="urn:uuid:x"),
                      "mhd-startswithoid"),
    "no custodian": (lambda b, d: d.pop("custodian"), "XDSRegistryMetadataError"),
    "author not contained": (lambda b, d: d["author"].append({"reference": "Device/1"}),
                             "ContainedReference"),
    "two submission sets": (lambda b, d: b["entry"].append(copy.deepcopy(b["entry"][0])),
                            "XDSRegistryMetadataError"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_non_conformant_bundles_are_refused_naming_the_rule(registry: RegistryProcess,
                                                            name: str) -> None:
    change, rule = MUTATIONS[name]
    response = httpx.post(registry.fhir_url, json=_mutated(change), headers=FHIR)
    assert response.status_code == 422, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert rule in [issue["details"]["text"] for issue in outcome["issue"]]
    assert _search(registry, {"identifier": "urn:ietf:rfc:3986|urn:oid:2.25.1234"})[
        "total"] == 0  # all or nothing


@pytest.mark.parametrize("body, headers, status", [
    (b"{not json", FHIR, 400),
    (b'{"resourceType": "Patient"}', FHIR, 400),
    (json.dumps(EXAMPLE).encode(), {"Content-Type": "application/fhir+xml"}, 415),
])
def test_unreadable_requests(registry: RegistryProcess, body: bytes, headers: dict,
                             status: int) -> None:
    response = httpx.post(registry.fhir_url, content=body, headers=headers)
    assert response.status_code == status
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("params", [{}, {"patient.identifier": INS}, {"foo": "bar"}])
def test_searches_without_what_iti67_requires(registry: RegistryProcess, params: dict) -> None:
    response = httpx.get(f"{registry.fhir_url}/DocumentReference", params=params)
    assert response.status_code == 400
    assert response.json()["issue"][0]["diagnostics"]


def test_flux3_patch_status_and_security_labels(registry: RegistryProcess) -> None:
    bundle = _mutated(lambda b, d: None)
    assert httpx.post(registry.fhir_url, json=bundle, headers=FHIR).status_code == 200
    uid = "urn:ietf:rfc:3986|urn:oid:2.25.1234"
    patch = {"Content-Type": "application/json-patch+json"}
    masked = httpx.patch(f"{registry.fhir_url}/DocumentReference", params={"identifier": uid},
                         headers=patch, content=json.dumps([{
                             "op": "add", "path": "/securityLabel/-",
                             "value": {"coding": [{"code": "MASQUE_PS"}]}}]))
    assert masked.status_code == 200, masked.text
    assert masked.json()["meta"]["versionId"] == "2"
    forbidden = httpx.patch(f"{registry.fhir_url}/DocumentReference/{masked.json()['id']}",
                            headers=patch, content=json.dumps([{"op": "replace", "path": "/type",
                                                                "value": {}}]))
    assert forbidden.status_code == 405
    bad_status = httpx.patch(f"{registry.fhir_url}/DocumentReference/{masked.json()['id']}",
                             headers=patch, content=json.dumps([{
                                 "op": "replace", "path": "/status",
                                 "value": "entered-in-error"}]))
    assert bad_status.status_code == 422  # not in the MHD status value set
    withdrawn = httpx.patch(f"{registry.fhir_url}/DocumentReference/{masked.json()['id']}",
                            headers=patch, content=json.dumps([{
                                "op": "replace", "path": "/status", "value": "superseded"}]))
    assert withdrawn.json()["status"] == "superseded"
    assert _search(registry, {"identifier": uid})["entry"][0]["resource"]["status"] == \
        "superseded"


def _errors(bundle: dict) -> set[tuple[str, str]]:
    """(rule, where) of every error the validator finds."""
    return {(issue.details, issue.expression) for issue in check_provide_bundle(bundle)
            if issue.severity == "error"}


def _official(name: str) -> dict:
    return json.loads((DATA / "pdsm" / name).read_text(encoding="utf-8"))


REPLACE_EXAMPLE = "ig-examples-branch-add-exemples-iti65/" \
    "Bundle-bundle-exemple-comprehensiveprovidedocument-replace.json"
DMP_EXAMPLES = ("pdsm4dmp-examples/Bundle-example-td2-iti65-lot-soumission.json",
                "pdsm4dmp-examples/Bundle-example-td2-1-remplacement.json")
DOCUMENT = "Bundle.entry[1].resource"
# The defects tests/data/README.md lists for each official example (a subset of what the
# validator reports: it also refuses what the local registry does not support).
KNOWN_DEFECTS = {
    REPLACE_EXAMPLE: {("XDSRegistryMetadataError", f"{DOCUMENT}.custodian"),
                      ("mhd-startswithoid", f"{DOCUMENT}.masterIdentifier"),
                      ("XDSNonIdenticalHash", f"{DOCUMENT}.content[0].attachment.hash"),
                      ("ConfidentialityCode", f"{DOCUMENT}.securityLabel")},
    **{name: {("XDSRegistryMetadataError", f"{DOCUMENT}.custodian"),
              ("mhd-startswithoid", f"{DOCUMENT}.masterIdentifier")} for name in DMP_EXAMPLES},
}


@pytest.mark.parametrize("name", KNOWN_DEFECTS)
def test_official_examples_are_refused_for_their_known_defects(name: str) -> None:
    assert KNOWN_DEFECTS[name] <= _errors(_official(name))


@pytest.mark.parametrize("name", DMP_EXAMPLES)
def test_official_examples_pass_once_their_known_defects_are_fixed(name: str) -> None:
    bundle = _official(name)
    submission, document = bundle["entry"][0]["resource"], bundle["entry"][1]["resource"]
    document["masterIdentifier"]["use"] = "usual"
    document["custodian"] = {"type": "Organization", "identifier": {
        "system": "urn:oid:1.2.250.1.71.4.2.2", "value": "1999000011"}}
    # Not a defect (PDSm: 0..1) but required by this registry, as by an XDS registry.
    submission["identifier"] = [{"use": "usual", "system": pdsm.URI,
                                 "value": "urn:oid:1.2.250.1.999.1.1.9.1"}]
    assert _errors(bundle) == set()


def test_the_registry_constants_are_those_of_the_official_material() -> None:
    submission, document = elements(SUBMISSION_SET), elements(DOCUMENT_REFERENCE)
    assert submission["List.code"]["patternCodeableConcept"]["coding"] == [
        {"system": pdsm.LIST_TYPES, "code": pdsm.SUBMISSION_SET_CODE}]
    assert (submission["List.status"]["patternCode"], submission["List.mode"]["patternCode"]) \
        == (pdsm.SUBMISSION_SET_STATUS, pdsm.SUBMISSION_SET_MODE)
    assert [submission[f"List.extension:{name}"]["type"][0]["profile"]
            for name in ("designationType", "sourceId")] == [[pdsm.DESIGNATION_TYPE],
                                                              [pdsm.SOURCE_ID]]
    related = "DocumentReference.context.related:referenceIdList.identifier.type.coding.system"
    assert document[related]["patternUri"] == pdsm.URI
    for name in (REPLACE_EXAMPLE, *DMP_EXAMPLES):
        assert _official(name)["meta"]["profile"] == [pdsm.BUNDLE_PROFILE], name


REQUIRED = [(resource_type, path, url)
            for resource_type, profile in (("List", SUBMISSION_SET),
                                           ("DocumentReference", DOCUMENT_REFERENCE))
            for path, url in mandatory(profile).items()]


def test_the_profiles_make_the_expected_elements_mandatory() -> None:
    paths = {(resource_type, path) for resource_type, path, _ in REQUIRED}
    assert {("List", "extension:sourceId"), ("List", "source"),
            ("DocumentReference", "masterIdentifier"), ("DocumentReference", "custodian"),
            ("DocumentReference", "content.attachment.hash"),
            ("DocumentReference", "context.sourcePatientInfo")} <= paths


@pytest.mark.parametrize("resource_type, path, url", REQUIRED,
                         ids=[f"{kind}.{path}" for kind, path, _ in REQUIRED])
def test_a_bundle_without_an_element_the_profiles_require_is_refused(
        resource_type: str, path: str, url: str | None) -> None:
    bundle = copy.deepcopy(EXAMPLE)
    resource = next(entry["resource"] for entry in bundle["entry"]
                    if entry["resource"]["resourceType"] == resource_type)
    assert remove(resource, path, url)
    assert _errors(bundle)
