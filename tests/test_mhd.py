"""The ITI-65 bundle built from a stored study: conformant to the PDSm rules the local
registry checks, valid FHIR (fhir.resources R4B), with every element the official PDSm
profiles make mandatory; and a wrong publishing constant is caught by the registry."""

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom import dcmread
from pydicom.uid import generate_uid

from gateway.config import Settings
from gateway.publication import mhd
from gateway.publication.confidentiality import Confidentiality
from gateway.publication.event_codes import DCM, SNOMED, load_event_codes
from gateway.publication.kos import Issuers, RetrieveOrigin, build_manifest
from gateway.publication.mhd import (
    MetadataError,
    document_id,
    provide_document_bundle,
)
from gateway.publication.publisher import issuers_from_settings, producer_from_settings
from gateway.registry.validate import check_provide_bundle
from storage.store import Outcome, Store
from storage.study_contents import StudyContents, load_study_contents
from tests.pdsm_profiles import DOCUMENT_REFERENCE, SUBMISSION_SET, has, mandatory
from tests.synthetic import national_ct_slice, part10

SETTINGS = Settings(
    gateway_oid="1.2.250.1.999.1.1.9", organization_name="CH Exemple",
    organization_finess="999000011", order_issuer_oid="1.2.250.1.999.1.1.3",
    authenticator_idnps="810101201234", authenticator_name="LECLERC^Sophie").producer
PRODUCER = producer_from_settings(SETTINGS)
ISSUERS = issuers_from_settings(SETTINGS)
ORIGIN = RetrieveOrigin("https://imagerie.example.org", "1.2.250.1.999.1.1.9")

HAND_WRITTEN = Path(__file__).parent / "data" / "fixtures" / "iti65-kos-bundle.json"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


def _stored_study(store: Store, ins: bool = True) -> StudyContents:
    study, series = generate_uid(), generate_uid()
    for number in (1, 2, 3):
        result = store.ingest(part10(national_ct_slice(study, series, 1, number, ins)), "test")
        assert result.outcome is Outcome.STORED
    contents = load_study_contents(store.index, study)
    assert contents is not None
    return contents


def _bundle(study: StudyContents, replaces: str = "", issuers: Issuers = ISSUERS) -> dict:
    manifest = build_manifest(study, ORIGIN, issuers)
    events, unknown = load_event_codes().codes([s.modality for s in study.series],
                                               [s.body_part for s in study.series])
    assert unknown == []
    return provide_document_bundle(manifest, PRODUCER, events, Confidentiality(),
                                   replaces=replaces)


def test_bundle_passes_the_registry_rules_and_fhir_structure(store: Store) -> None:
    bundle = _bundle(_stored_study(store))
    assert check_provide_bundle(bundle) == []
    Bundle.model_validate(bundle)  # FHIR structure (R4B models; R4 has no Python package)


def test_bundle_carries_the_imaging_metadata(store: Store) -> None:
    study = _stored_study(store)
    bundle = _bundle(study)
    submission, document, binary = (entry["resource"] for entry in bundle["entry"])
    kos = base64.b64decode(binary["data"])
    assert dcmread(BytesIO(kos)).SOPInstanceUID == \
        document["masterIdentifier"]["value"].removeprefix("urn:oid:")
    attachment = document["content"][0]["attachment"]
    assert attachment["size"] == len(kos)
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(kos).digest()).decode()
    assert attachment["url"] == bundle["entry"][2]["fullUrl"]
    events = {(c["system"], c["code"]) for e in document["context"]["event"]
              for c in e["coding"]}
    assert events == {(DCM, "CT"), (SNOMED, "67734004")}  # CT of the CHEST
    related = {(r["identifier"]["type"]["coding"][0]["code"], r["identifier"].get("system"),
                r["identifier"]["value"]) for r in document["context"]["related"]}
    assert related == {
        ("urn:ihe:iti:xds:2013:accession", "urn:oid:1.2.250.1.999.1.1.2", "ACC-2026-000457"),
        ("urn:ihe:iti:xds:2016:studyInstanceUID", None, study.study_uid),
        ("urn:ihe:iti:xds:2013:order", "urn:oid:1.2.250.1.999.1.1.3", "CMD-2026-88812")}
    ins = {"system": "urn:oid:1.2.250.1.213.1.4.10", "value": "279035121518989"}
    assert document["subject"]["identifier"] == submission["subject"]["identifier"] == ins
    patient = next(c for c in document["contained"] if c["resourceType"] == "Patient")
    assert [i["type"]["coding"][0]["code"] for i in patient["identifier"]] == ["INS-NIR-TEST"]
    assert document["context"]["period"]["start"].startswith("2026-01-10T10:15:00")
    organization = next(c for c in document["contained"] if c["resourceType"] == "Organization")
    assert [i["value"] for i in organization["identifier"]] == ["1999000011", "999000011"]


def test_bundle_has_every_element_the_pdsm_profiles_make_mandatory(store: Store) -> None:
    bundle = _bundle(_stored_study(store))
    resources = {entry["resource"]["resourceType"]: entry["resource"] for entry in bundle["entry"]}
    for resource_type, profile in (("List", SUBMISSION_SET),
                                   ("DocumentReference", DOCUMENT_REFERENCE)):
        missing = [path for path, url in mandatory(profile).items()
                   if not has(resources[resource_type], path, url)]
        assert missing == [], resource_type


def _set_item(constant: str, key: str, value: object) -> Callable[[pytest.MonkeyPatch], None]:
    """Change one entry of a dict constant of gateway.publication.mhd in place, so that any
    module holding the same dict (as the registry's validator once did) sees the change."""
    return lambda monkeypatch: monkeypatch.setitem(getattr(mhd, constant), key, value)


def _set(constant: str, value: object) -> Callable[[pytest.MonkeyPatch], None]:
    return lambda monkeypatch: monkeypatch.setattr(mhd, constant, value)


WRONG_CONSTANTS = {
    # deprecated in TRE_A09 since 2017
    "format": (_set_item("FORMAT", "code", "urn:ihe:rad:1.2.840.10008.5.1.4.1.1.88.59"),
               "Bundle.entry[1].resource.content[0].format"),
    # LOINC's imaging report, not the KOS
    "type": (_set_item("TYPE", "code", "18748-4"), "Bundle.entry[1].resource.type"),
    # TRE_A03 11 "Synthèse"
    "category": (_set_item("CATEGORY", "code", "11"), "Bundle.entry[1].resource.category"),
    "study uid type": (_set_item("REFERENCE_ID_TYPES", "study",
                                 "urn:ihe:iti:xds:2013:studyInstanceUID"),
                       "Bundle.entry[1].resource.context.related"),
    # the misspelt TRE_A07 canonical of the official PDSm examples
    "confidentiality system": (_set("CONFIDENTIALITY_SYSTEMS", (
        f"{mhd.NOS}TRE_A07-StatusVisibiliteDocument/FHIR/TRE-A07-StatusVisibiliteDocument",)),
        "Bundle.entry[1].resource.securityLabel"),
    "profile base": (_set("PDSM", "https://interop.esante.gouv.fr/ig/fhir/pdsm/"),
                     "Bundle.meta.profile"),
}


@pytest.mark.parametrize("name", WRONG_CONSTANTS)
def test_a_wrong_publishing_constant_is_refused_by_the_registry(
        store: Store, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    change, where = WRONG_CONSTANTS[name]
    change(monkeypatch)
    bundle = _bundle(_stored_study(store))
    assert where in {issue.expression for issue in check_provide_bundle(bundle)
                     if issue.severity == "error"}


def test_bundle_is_shaped_like_an_independent_example(store: Store) -> None:
    """Against a bundle written by hand from the IG (tests/data/fixtures), not by our
    builder: same entries in the same order, same fixed codes."""
    ours = _bundle(_stored_study(store))
    example = json.loads(HAND_WRITTEN.read_text())
    assert [(e["request"]["method"], e["request"]["url"]) for e in ours["entry"]] == \
        [(e["request"]["method"], e["request"]["url"]) for e in example["entry"]]
    optional = {"description", "note"}  # free text the example adds
    for ours_entry, example_entry in zip(ours["entry"], example["entry"], strict=True):
        mine, theirs = ours_entry["resource"], example_entry["resource"]
        assert set(theirs) - optional <= set(mine), mine["resourceType"]
        for key in ("type", "category", "code", "mode", "status", "contentType"):
            assert mine.get(key) == theirs.get(key), key
    doc, written = ours["entry"][1]["resource"], example["entry"][1]["resource"]
    assert doc["content"][0]["format"] == written["content"][0]["format"]
    assert set(doc["context"]) >= set(written["context"])
    assert doc["securityLabel"][0]["coding"][0]["system"] == \
        written["securityLabel"][0]["coding"][0]["system"]


def test_a_replacement_supersedes_the_previous_document(store: Store) -> None:
    bundle = _bundle(_stored_study(store), replaces="DocumentReference/41")
    assert check_provide_bundle(bundle) == []
    document = bundle["entry"][1]["resource"]
    assert document["relatesTo"] == [{"code": "replaces",
                                      "target": {"reference": "DocumentReference/41"}}]
    patch = bundle["entry"][3]
    assert patch["request"] == {"method": "PATCH", "url": "DocumentReference/41"}
    assert patch["resource"]["parameter"][0]["part"][2] == {"name": "value",
                                                            "valueCode": "superseded"}


def test_a_patient_without_ins_needs_an_issuer_oid(store: Store) -> None:
    study = _stored_study(store, ins=False)
    with pytest.raises(MetadataError, match="patient_id_issuer_oid"):
        _bundle(study)
    issuers = dataclasses.replace(ISSUERS, patient_id="1.2.250.1.999.1.1.1")
    bundle = _bundle(study, issuers=issuers)
    assert bundle["entry"][1]["resource"]["subject"]["identifier"] == {
        "system": "urn:oid:1.2.250.1.999.1.1.1", "value": "PAT001"}
    assert check_provide_bundle(bundle) == []


def test_event_code_table(tmp_path: Path) -> None:
    table = load_event_codes()
    codes, unknown = table.codes(["CT", "ct", "SR", "KO", "ZZ"],
                                 ["Thorax", "CHEST", "genou", "CHESTABDOMEN", "", "ELBOW_X"])
    assert [(c.system, c.code) for c in codes] == [
        (DCM, "CT"), (SNOMED, "67734004"), (SNOMED, "61685007"), (SNOMED, "63337009")]
    assert unknown == ["Modality ZZ", "BodyPartExamined ELBOW_X"]
    extra = tmp_path / "local.toml"
    extra.write_text('[modalities]\nZZ = "Local"\n[body_parts]\n"ELBOW X" = "53120007"\n')
    codes, unknown = load_event_codes(extra).codes(["ZZ"], ["ELBOW_X"])
    assert [c.code for c in codes] == ["ZZ", "53120007"] and unknown == []
    extra.write_text('[body_parts]\nODD = "12345"\n')
    with pytest.raises(ValueError, match="not listed in"):
        load_event_codes(extra)


def test_document_id_from_a_transaction_response() -> None:
    response = {"entry": [{"response": {"location": "List/1/_history/1"}},
                          {"response": {"location": "http://r/fhir/DocumentReference/8f2/"
                                                  "_history/1"}}]}
    assert document_id(response) == "DocumentReference/8f2"
    assert document_id({"entry": []}) == ""
