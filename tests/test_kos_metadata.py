"""What the manifest says of the patient, the study and its requests, and the ITI-65 metadata
read from it: configured assigning authorities written into the KOS (never an empty issuer
sequence), requests kept as the instances pair them, no Retrieve AE Title, PN component
groups as FHIR names, and a study the registry could not index refused before sending.

Each KOS built here is checked by dicom3tools: ``dciodvfy`` (the IOD) and ``dcentvfy`` (the
KOS against the instances it references); each bundle by the local registry's rules and the
FHIR R4B models."""

import dataclasses
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from gateway.publication.confidentiality import Confidentiality
from gateway.publication.event_codes import load_event_codes
from gateway.publication.kos import Issuers, Manifest, RetrieveOrigin, build_manifest
from gateway.publication.mhd import (
    NAME_REPRESENTATION,
    MetadataError,
    Producer,
    orders_without_authority,
    provide_document_bundle,
)
from gateway.registry.validate import check_provide_bundle
from storage.store import Outcome, Store
from storage.study_contents import StudyContents, load_study_contents
from tests.synthetic import ct_slice, national_ct_slice, part10

ORIGIN = RetrieveOrigin("https://imagerie.example.org", "1.2.250.1.999.1.1.9")
CONFIGURED = Issuers(patient_id="1.2.250.1.999.1.1.1", accession="1.2.250.1.999.1.1.2",
                     order="1.2.250.1.999.1.1.3")
NONE = Issuers()
PRODUCER = Producer("1.2.250.1.999.1.1.9", "CH Exemple", "999000011", "SA01", "ETABLISSEMENT",
                    "07", "", "")
DICOM3TOOLS = pytest.mark.skipif(shutil.which("dciodvfy") is None or
                                 shutil.which("dcentvfy") is None, reason="needs dicom3tools")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


def _stored(store: Store, datasets: list[Dataset]) -> StudyContents:
    for ds in datasets:
        assert store.ingest(part10(ds), "test").outcome is Outcome.STORED
    contents = load_study_contents(store.index, datasets[0].StudyInstanceUID)
    assert contents is not None
    return contents


def _errors(command: list[str]) -> list[str]:
    result = subprocess.run(command, capture_output=True, text=True, errors="replace",
                            check=False)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


def _verified(store: Store, study: StudyContents, tmp_path: Path,
              issuers: Issuers = NONE) -> tuple[Manifest, Dataset]:
    """The study's manifest, once dciodvfy and dcentvfy found no error in it."""
    manifest = build_manifest(study, ORIGIN, issuers)
    path = tmp_path / f"{manifest.sop_uid}.dcm"
    path.write_bytes(manifest.data)
    instances = [str(store.blobs.absolute(row[0])) for row in store.index.fetch(
        "SELECT i.path FROM instances i JOIN series se ON i.series_pk = se.pk JOIN studies st"
        " ON se.study_pk = st.pk WHERE st.study_uid = ?", (study.study_uid,))]
    assert _errors(["dciodvfy", str(path)]) == []
    assert _errors(["dcentvfy", str(path), *instances]) == []
    return manifest, dcmread(BytesIO(manifest.data))


def _bundle(manifest: Manifest, study: StudyContents) -> dict:
    events, _ = load_event_codes().codes([s.modality for s in study.series],
                                         [s.body_part for s in study.series])
    return provide_document_bundle(manifest, PRODUCER, events, Confidentiality())


def _universal(item: Dataset, keyword: str) -> list[tuple[str, str]]:
    return [(i.UniversalEntityID, i.UniversalEntityIDType) for i in item.get(keyword, [])]


def _plain_slice(study: str, series: str, number: int, **attributes: object) -> Dataset:
    """A slice whose identifiers carry no assigning authority (no accession issuer)."""
    return ct_slice(study, series, 1, number, size=4, **attributes)


@DICOM3TOOLS
def test_no_issuer_anywhere_leaves_the_sequence_out(store: Store, tmp_path: Path) -> None:
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), n) for n in (1, 2)])
    _, kos = _verified(store, study, tmp_path)  # dciodvfy: no "Bad Sequence number of Items 0"
    assert "IssuerOfAccessionNumberSequence" not in kos
    assert "IssuerOfAccessionNumberSequence" not in kos.ReferencedRequestSequence[0]
    assert kos.ReferencedRequestSequence[0].AccessionNumber == "ACC001"
    assert "IssuerOfPatientIDQualifiersSequence" not in kos


@DICOM3TOOLS
def test_configured_issuers_are_written_into_the_manifest(store: Store, tmp_path: Path) -> None:
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), n,
                                         PlacerOrderNumberImagingServiceRequest="CMD-7")
                            for n in (1, 2)])
    _, kos = _verified(store, study, tmp_path, CONFIGURED)
    iso = [("1.2.250.1.999.1.1.2", "ISO")]
    assert _universal(kos, "IssuerOfAccessionNumberSequence") == iso
    [request] = kos.ReferencedRequestSequence
    assert _universal(request, "IssuerOfAccessionNumberSequence") == iso
    assert _universal(request, "OrderPlacerIdentifierSequence") == [("1.2.250.1.999.1.1.3",
                                                                     "ISO")]
    assert (kos.IssuerOfPatientID, _universal(kos, "IssuerOfPatientIDQualifiersSequence")) == \
        ("HOSP", [("1.2.250.1.999.1.1.1", "ISO")])


@DICOM3TOOLS
def test_the_instances_issuer_wins_over_the_configured_one(store: Store,
                                                           tmp_path: Path) -> None:
    study = _stored(store, [national_ct_slice(generate_uid(), generate_uid(), 1, 1)])
    other = dataclasses.replace(CONFIGURED, accession="1.2.250.1.999.7")
    _, kos = _verified(store, study, tmp_path, other)
    assert _universal(kos, "IssuerOfAccessionNumberSequence") == [("1.2.250.1.999.1.1.2",
                                                                   "ISO")]


def test_an_issuer_named_by_a_local_oid_is_the_accession_system(store: Store) -> None:
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "1.2.250.1.999.5"
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), 1,
                                         IssuerOfAccessionNumberSequence=Sequence([issuer]))])
    bundle = _bundle(build_manifest(study, ORIGIN, CONFIGURED), study)
    [accession] = [r["identifier"] for r in bundle["entry"][1]["resource"]["context"]["related"]
                   if r["identifier"]["value"] == "ACC001"]
    assert accession["system"] == "urn:oid:1.2.250.1.999.5"


def _requested(procedure: str, order: str, accession: str = "") -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = procedure
    item.ScheduledProcedureStepID = f"SPS-{procedure}"
    item.PlacerOrderNumberImagingServiceRequest = order
    if accession:
        item.AccessionNumber = accession
    return item


@DICOM3TOOLS
def test_requests_keep_their_pairing(store: Store, tmp_path: Path) -> None:
    study_uid, first, second = generate_uid(), generate_uid(), generate_uid()
    both = Sequence([_requested("RP-1", "CMD-1"), _requested("RP-2", "CMD-1")])
    study = _stored(store, [
        _plain_slice(study_uid, first, 1, RequestAttributesSequence=both),
        _plain_slice(study_uid, first, 2, RequestAttributesSequence=both),
        _plain_slice(study_uid, second, 3, RequestAttributesSequence=Sequence(
            [_requested("RP-3", "CMD-2", accession="ACC002")]))])
    manifest, kos = _verified(store, study, tmp_path, CONFIGURED)
    assert [(r.RequestedProcedureID, r.PlacerOrderNumberImagingServiceRequest,
             r.AccessionNumber) for r in kos.ReferencedRequestSequence] == [
        ("RP-1", "CMD-1", "ACC001"), ("RP-2", "CMD-1", "ACC001"), ("RP-3", "CMD-2", "ACC002")]
    related = [(r["identifier"]["type"]["coding"][0]["code"].rsplit(":", 1)[1],
                r["identifier"]["value"])
               for r in _bundle(manifest, study)["entry"][1]["resource"]["context"]["related"]]
    assert related == [("accession", "ACC001"), ("accession", "ACC002"),
                       ("studyInstanceUID", study_uid), ("order", "CMD-1"), ("order", "CMD-2")]


@DICOM3TOOLS
def test_no_retrieve_ae_title_without_query_retrieve(store: Store, tmp_path: Path) -> None:
    study = _stored(store, [national_ct_slice(generate_uid(), generate_uid(), 1, 1)])
    _, kos = _verified(store, study, tmp_path)
    [series] = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert "RetrieveAETitle" not in series
    assert series.RetrieveLocationUID == ORIGIN.location_uid
    assert series.RetrieveURL.startswith(f"{ORIGIN.public_url}/dicom-web/studies/")


@DICOM3TOOLS
def test_the_bundle_is_read_from_the_manifest(store: Store, tmp_path: Path) -> None:
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), 1,
                                         PlacerOrderNumberImagingServiceRequest="CMD-7")])
    manifest, kos = _verified(store, study, tmp_path, CONFIGURED)
    bundle = _bundle(manifest, study)
    assert check_provide_bundle(bundle) == []
    document = bundle["entry"][1]["resource"]
    patient = next(c for c in document["contained"] if c["resourceType"] == "Patient")
    assert patient["identifier"][0]["system"] == "urn:oid:1.2.250.1.999.1.1.1"
    assert document["subject"]["identifier"] == {"system": "urn:oid:1.2.250.1.999.1.1.1",
                                                 "value": kos.PatientID}
    related = {r["identifier"]["value"]: r["identifier"].get("system")
               for r in document["context"]["related"]}
    assert related == {"ACC001": "urn:oid:1.2.250.1.999.1.1.2", study.study_uid: None,
                       "CMD-7": "urn:oid:1.2.250.1.999.1.1.3"}
    # One source of truth: what the manifest says, the bundle says, whatever the index holds.
    kos.PatientName, kos.StudyDescription = "AUTRE^NOM", "IRM GENOU"
    kos.ReferencedRequestSequence[0].AccessionNumber = "ACC-KOS"
    out = BytesIO()
    kos.save_as(out, enforce_file_format=True)
    edited = _bundle(Manifest(manifest.sop_uid, manifest.series_uid, out.getvalue()), study)
    document = edited["entry"][1]["resource"]
    patient = next(c for c in document["contained"] if c["resourceType"] == "Patient")
    assert patient["name"] == [{"use": "official", "family": "AUTRE", "given": ["NOM"]}]
    assert document["content"][0]["attachment"]["title"].endswith(" - IRM GENOU")
    assert "ACC-KOS" in {r["identifier"]["value"] for r in document["context"]["related"]}


@DICOM3TOOLS
@pytest.mark.parametrize("charset, name", [
    ("ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("ISO_IR 100", "Müller^Jürgen^Karl^Dr.^"),
])
def test_person_name_groups_become_names_of_their_own(store: Store, tmp_path: Path,
                                                      charset: object, name: str) -> None:
    study = _stored(store, [national_ct_slice(generate_uid(), generate_uid(), 1, 1,
                                              SpecificCharacterSet=charset, PatientName=name)])
    manifest, kos = _verified(store, study, tmp_path, CONFIGURED)
    assert str(kos.PatientName) == name
    bundle = _bundle(manifest, study)
    assert check_provide_bundle(bundle) == []
    Bundle.model_validate(bundle)
    patient = next(c for c in bundle["entry"][1]["resource"]["contained"]
                   if c["resourceType"] == "Patient")
    if "Yamada" in name:
        assert patient["name"] == [
            {"use": "official", "family": "Yamada", "given": ["Tarou"]},
            {"extension": [{"url": NAME_REPRESENTATION, "valueCode": "IDE"}],
             "family": "山田", "given": ["太郎"]},
            {"extension": [{"url": NAME_REPRESENTATION, "valueCode": "SYL"}],
             "family": "やまだ", "given": ["たろう"]}]
    else:
        assert patient["name"] == [{"use": "official", "family": "Müller",
                                    "given": ["Jürgen", "Karl"], "prefix": ["Dr."]}]


@pytest.mark.parametrize("change, reason", [
    ({"AccessionNumber": ""}, "no Accession Number"),
    ({}, "accession number 'ACC001' has no assigning authority OID"),
    ({"PlacerOrderNumberImagingServiceRequest": "CMD-9"},
     "accession number 'ACC001' has no assigning authority OID"),
    ({"StudyDate": "", "StudyTime": ""}, "no Study Date"),
])
def test_what_the_registry_cannot_index_is_refused_before_sending(
        store: Store, tmp_path: Path, change: dict, reason: str) -> None:
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), 1, **change)])
    issuers = Issuers(patient_id=CONFIGURED.patient_id,
                      accession="" if "authority" in reason else CONFIGURED.accession)
    manifest = build_manifest(study, ORIGIN, issuers)
    with pytest.raises(MetadataError, match=reason):
        _bundle(manifest, study)


@DICOM3TOOLS
def test_an_order_without_authority_stays_in_the_kos_and_out_of_the_metadata(
        store: Store, tmp_path: Path) -> None:
    """A placer order number without its assigning authority does not hold the study back:
    the KOS keeps it as the instances carry it, referenceIdList leaves it out (a bare
    number the registry would refuse), and the bundle is one the registry accepts."""
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), 1,
                                         PlacerOrderNumberImagingServiceRequest="CMD-9")])
    manifest, kos = _verified(store, study, tmp_path, dataclasses.replace(CONFIGURED, order=""))
    [request] = kos.ReferencedRequestSequence
    assert request.PlacerOrderNumberImagingServiceRequest == "CMD-9"
    assert "OrderPlacerIdentifierSequence" not in request
    assert orders_without_authority(manifest) == ["CMD-9"]
    bundle = _bundle(manifest, study)
    assert check_provide_bundle(bundle) == []
    related = {r["identifier"]["value"]: r["identifier"].get("system")
               for r in bundle["entry"][1]["resource"]["context"]["related"]}
    assert related == {"ACC001": "urn:oid:1.2.250.1.999.1.1.2", study.study_uid: None}
    assert orders_without_authority(build_manifest(study, ORIGIN, CONFIGURED)) == []


def test_the_service_start_is_the_study_date_only(store: Store) -> None:
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), 1, StudyTime="")])
    bundle = _bundle(build_manifest(study, ORIGIN, CONFIGURED), study)
    assert bundle["entry"][1]["resource"]["context"]["period"] == {"start": "2026-01-10"}
