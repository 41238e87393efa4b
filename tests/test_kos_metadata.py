"""What the manifest says of the patient, the study and its requests, and the ITI-65 metadata
read from it: configured assigning authorities written into the KOS (never an empty issuer
sequence), requests kept as the instances pair them, no Retrieve AE Title, PN component
groups as FHIR names, and a study the registry could not index refused before sending.

Each KOS built here is checked by dicom3tools: ``dciodvfy`` (the IOD) and ``dcentvfy`` (the
KOS against the instances it references); each bundle by the local registry's rules and the
FHIR R4B models."""

import dataclasses
import shutil
import sqlite3
import subprocess
from io import BytesIO
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from sqlalchemy import text

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
from storage.store import DuplicatePolicy, Outcome, Store
from storage.study_contents import StudyContents, load_study_contents
from tests.old_index import downgrade_to_baseline
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
        " ON se.study_pk = st.pk WHERE st.study_uid = :study_uid",
        {"study_uid": study.study_uid})]
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


def _qualifier(universal: str, kind: str = "ISO") -> Sequence:
    item = Dataset()
    item.UniversalEntityID, item.UniversalEntityIDType = universal, kind
    return Sequence([item])


@DICOM3TOOLS
def test_the_instances_own_patient_id_authority_wins_over_the_configured_one(
        store: Store, tmp_path: Path) -> None:
    """Issuer of Patient ID Qualifiers Sequence names the authority of Patient ID (PS3.3
    Table 10-18): the document is filed under it, the configured OID is for instances that
    name none."""
    study = _stored(store, [_plain_slice(
        generate_uid(), generate_uid(), 1, IssuerOfPatientID="HOSP",
        IssuerOfPatientIDQualifiersSequence=_qualifier("1.2.250.1.555.1"))])
    manifest, kos = _verified(store, study, tmp_path, CONFIGURED)
    assert (kos.IssuerOfPatientID, _universal(kos, "IssuerOfPatientIDQualifiersSequence")) == \
        ("HOSP", [("1.2.250.1.555.1", "ISO")])
    document = _bundle(manifest, study)["entry"][1]["resource"]
    assert document["subject"]["identifier"] == {"system": "urn:oid:1.2.250.1.555.1",
                                                 "value": "PAT001"}


@pytest.mark.parametrize("keyword, universal, reason", [
    ("IssuerOfAccessionNumberSequence", "ris.example.org",
     "accession number 'ACC001' is issued by 'ris.example.org' (DNS), not an ISO OID, which "
     "the registry needs (referenceIdList): the instances' Issuer of Accession Number "
     "Sequence must name its OID (accession_issuer_oid applies only where they name no "
     "universal issuer)"),
    ("IssuerOfPatientIDQualifiersSequence", "hosp.example.org",
     "patient 'PAT001' has no INS, and the instances name its assigning authority "
     "'hosp.example.org' (DNS), not an ISO OID"),
])
def test_a_universal_issuer_that_is_no_oid_is_kept_and_refused_for_what_it_is(
        store: Store, keyword: str, universal: str, reason: str) -> None:
    """The configured OID does not replace the instances' own universal issuer (it would
    state another authority); the refusal says what would fix it, not the setting."""
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), 1,
                                         **{keyword: _qualifier(universal, "DNS")})])
    manifest = build_manifest(study, ORIGIN, CONFIGURED)
    assert _universal(dcmread(BytesIO(manifest.data)), keyword) == [(universal, "DNS")]
    with pytest.raises(MetadataError) as refused:
        _bundle(manifest, study)
    assert str(refused.value).startswith(reason)


def test_a_local_accession_namespace_takes_the_configured_oid_as_its_universal_id(
        store: Store) -> None:
    """accession_issuer_oid is the OID of the authority the instances name locally (PS3.3
    Table 10-17: both fields identify one entity), so the KOS keeps both in one item."""
    local = Dataset()
    local.LocalNamespaceEntityID = "RIS_X"
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), 1,
                                         IssuerOfAccessionNumberSequence=Sequence([local]))])
    kos = dcmread(BytesIO(build_manifest(study, ORIGIN, CONFIGURED).data))
    [item] = kos.IssuerOfAccessionNumberSequence
    assert (item.LocalNamespaceEntityID, item.UniversalEntityID, item.UniversalEntityIDType) \
        == ("RIS_X", "1.2.250.1.999.1.1.2", "ISO")


@DICOM3TOOLS
def test_a_corrected_study_gets_a_manifest_of_its_own(tmp_path: Path) -> None:
    """The manifest UID follows what the manifest states, not only which instances it
    references: a study resent corrected (overwrite) gets a new manifest, which replaces
    the published one; the same study, received again later, keeps its manifest UID."""
    store = Store(tmp_path / "data", DuplicatePolicy.OVERWRITE)
    study_uid, series_uid, sop_uid = generate_uid(), generate_uid(), generate_uid()
    first = _stored(store, [_plain_slice(study_uid, series_uid, 1, sop_uid=sop_uid,
                                         PatientName="ERREUR^NOM")])
    before = build_manifest(first, ORIGIN, CONFIGURED)
    later = dataclasses.replace(first, last_received_at=first.last_received_at + 3600)
    assert build_manifest(later, ORIGIN, CONFIGURED).sop_uid == before.sop_uid
    assert store.ingest(part10(_plain_slice(study_uid, series_uid, 1, sop_uid=sop_uid,
                                            PatientName="BON^NOM")), "test").replaced
    corrected = load_study_contents(store.index, study_uid)
    assert corrected is not None
    after, kos = _verified(store, corrected, tmp_path, CONFIGURED)
    assert after.sop_uid != before.sop_uid and kos.PatientName == "BON^NOM"
    assert build_manifest(corrected, ORIGIN, NONE).sop_uid != after.sop_uid  # issuers too


def test_series_indexed_before_v7_take_the_requests_the_study_row_kept(store: Store) -> None:
    """Series indexed before v7 kept no requests (the v7 column starts empty): the manifest
    takes the Requested Procedure IDs and Placer Order Numbers of the study row, paired by
    position when the lists are as long, with the one order when there is one."""
    study_uid = generate_uid()
    _stored(store, [_plain_slice(study_uid, generate_uid(), 1, RequestAttributesSequence=Sequence(
        [_requested("RP-1", "CMD-1"), _requested("RP-2", "CMD-1")]))])
    with store.index.transaction() as db:  # what the v7 migration leaves
        db.execute(text("UPDATE series SET requests = ''"))
    study = load_study_contents(store.index, study_uid)
    assert study is not None
    kos = dcmread(BytesIO(build_manifest(study, ORIGIN, CONFIGURED).data))
    assert [(r.AccessionNumber, r.RequestedProcedureID, r.PlacerOrderNumberImagingServiceRequest,
             _universal(r, "OrderPlacerIdentifierSequence"))
            for r in kos.ReferencedRequestSequence] == [
        ("ACC001", procedure, "CMD-1", [("1.2.250.1.999.1.1.3", "ISO")])
        for procedure in ("RP-1", "RP-2")]
    # A series received since then states its own requests; the old one keeps the study's.
    _stored(store, [_plain_slice(study_uid, generate_uid(), 2, RequestedProcedureID="RP-1",
                                 PlacerOrderNumberImagingServiceRequest="CMD-1")])
    study = load_study_contents(store.index, study_uid)
    assert study is not None
    kos = dcmread(BytesIO(build_manifest(study, ORIGIN, CONFIGURED).data))
    assert [(r.RequestedProcedureID, r.PlacerOrderNumberImagingServiceRequest)
            for r in kos.ReferencedRequestSequence] == [("RP-1", "CMD-1"), ("RP-2", "CMD-1")]


def test_an_index_of_v8_reads_the_patient_id_authority_of_its_studies_again(
        tmp_path: Path) -> None:
    """The v9 upgrade reads Issuer of Patient ID Qualifiers Sequence again from the first
    instance of each study indexed before it, so their manifests name the authority too."""
    store = Store(tmp_path / "data")
    study = _stored(store, [_plain_slice(generate_uid(), generate_uid(), 1,
                                         IssuerOfPatientIDQualifiersSequence=_qualifier(
                                             "1.2.250.1.555.1"))])
    store.close()
    downgrade_to_baseline(tmp_path / "data" / "index.sqlite")
    db = sqlite3.connect(tmp_path / "data" / "index.sqlite")  # the index as v8 left it
    db.execute("ALTER TABLE studies DROP COLUMN patient_id_qualifiers")
    db.execute("DROP INDEX instances_path")  # v10, after
    db.execute("DROP TABLE alembic_version")  # Alembic came after v11
    db.execute("PRAGMA user_version = 8")
    db.commit()
    db.close()
    store = Store(tmp_path / "data")
    upgraded = load_study_contents(store.index, study.study_uid)
    assert upgraded is not None
    kos = dcmread(BytesIO(build_manifest(upgraded, ORIGIN, CONFIGURED).data))
    assert _universal(kos, "IssuerOfPatientIDQualifiersSequence") == [("1.2.250.1.555.1",
                                                                       "ISO")]
    store.close()
