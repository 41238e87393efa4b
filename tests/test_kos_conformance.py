"""The KOS and its ITI-65 metadata across the studies that stress the builder, checked by the
independent tools of tests/conformance (dciodvfy and dcentvfy, the PDSm profiles, the
metadata against its own KOS), end to end: real C-STORE into ``passerelle serve``,
publication to ``passerelle registry``, documents read back over ITI-67 / ITI-68.

Two services, one per configuration, each receiving every study at once: the embedded default
(no issuer configured) and every issuer configured (patient_id_issuer_oid,
accession_issuer_oid, order_issuer_oid). A study is either published with zero problems or,
where the registry metadata cannot be complete (no Accession Number, an accession without
its assigning authority: issue 15 finding 9; no Study Date for PDSm's context.period.start
1..1, which finding 10 forbids inventing), refused by the gateway before sending, with the
reason in the outbox. A placer order without its assigning authority does not hold a study
back: it stays in the KOS and is left out of the registry metadata.
"""

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from gateway.publication.event_codes import load_event_codes
from gateway.publication.kos import RetrieveOrigin, build_manifest
from gateway.publication.mhd import provide_document_bundle
from gateway.publication.publisher import issuers_from_settings, producer_from_settings
from storage.index import Index
from storage.outbox import Outbox, Publication, State
from storage.study_contents import load_study_contents
from tests.conformance import (
    BUNDLE_PROFILE,
    DOCUMENT_PROFILE,
    assert_bundle_conformant,
    bundle_problems,
    profile_problems,
)
from tests.conformance.consistency import metadata_problems
from tests.conformance.dicom3tools import kos_problems
from tests.conformance.profiles import Checker, vendored
from tests.inprocess import InProcessService
from tests.processes import PasserelleProcess, RegistryProcess, wait_for
from tests.scu import associate
from tests.synthetic import ct_slice, national_ct_slice

INS = ("urn:oid:1.2.250.1.213.1.4.10", "279035121518989")
ISSUERS = {"patient_id_issuer_oid": "1.2.250.1.999.1.1.1",
           "accession_issuer_oid": "1.2.250.1.999.1.1.2",
           "order_issuer_oid": "1.2.250.1.999.1.1.3"}
FAST = {"stable_seconds": "1", "publish_retry_seconds": "0.2",
        "publish_retry_max_seconds": "1", "registry_timeout": "10"}
LARGE = 2000


def _request(procedure: str, order: str, description: str = "") -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = procedure
    if description:
        item.RequestedProcedureDescription = description
    item.PlacerOrderNumberImagingServiceRequest = order
    item.ScheduledProcedureStepID = f"SPS-{procedure}"
    return item


def _national(study: str, series: str, number: int, patient: str) -> Dataset:
    return national_ct_slice(study, series, 1, number, PatientID=patient)


def _no_issuer(study: str, series: str, number: int, patient: str) -> Dataset:
    """A local patient ID with a non-OID issuer, an accession without issuer, no INS."""
    return ct_slice(study, series, 1, number, size=4, patient_id=patient)


def _without(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
    return change


def _set(**attributes: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return change


def _requests(ds: Dataset) -> None:
    """Three requested procedures of two orders, in the Request Attributes Sequence where a
    modality puts them (PS3.3 C.4.10), and no placer order outside it."""
    ds.RequestAttributesSequence = Sequence([_request("RP-1", "CMD-1", "THORAX"),
                                             _request("RP-2", "CMD-1", "ABDOMEN"),
                                             _request("RP-3", "CMD-2", "PELVIS")])
    del ds.PlacerOrderNumberImagingServiceRequest


@dataclass(frozen=True)
class Case:
    """A study: how its instances are made, and whether each configuration may publish it."""

    name: str
    make: Callable[..., Dataset]
    change: Callable[[Dataset], None] | None = None  # what the case alters
    count: int = 3
    refused_by_default: str = ""  # the reason's keyword when the embedded default refuses it
    refused_with_issuers: str = ""


CASES = [
    Case("national identifiers", _national),
    Case("accession without issuer", _national,
         _without("IssuerOfAccessionNumberSequence"), refused_by_default="accession"),
    Case("no issuer at all", _no_issuer, refused_by_default="issuer"),
    Case("no accession number", _national, _without("AccessionNumber"),
         refused_by_default="accession", refused_with_issuers="accession"),
    Case("several requests", _national, _requests),
    Case("ISO_IR 100 names", _national, _set(
        SpecificCharacterSet="ISO_IR 100", PatientName="Müller-Lüdenscheidt^Jürgen^Émile",
        StudyDescription="Thorax, coupes fines (étude)", ReferringPhysicianName="Gaël^Zoé")),
    Case("ISO_IR 192 ideographic and phonetic groups", _national, _set(
        SpecificCharacterSet="ISO_IR 192", PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
        StudyDescription="胸部CT")),
    Case("no dates, no demographics", _national, _without(
        "StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "PatientBirthDate",
        "PatientSex", "ReferringPhysicianName", "StudyDescription"),
         # PDSm context.period.start is 1..1 and the study has no date to put there.
         refused_by_default="study date", refused_with_issuers="study date"),
]


def _studies(folder: Path, cases: list[Case]) -> dict[str, tuple[Case, list[Path]]]:
    """Each case's instances as Part 10 files (a study and two series each, a patient of
    its own: PAT-<n>), by study UID."""
    studies = {}
    for n, case in enumerate(cases):
        study, series = generate_uid(), [generate_uid(), generate_uid()]
        paths = []
        for number in range(1, case.count + 1):
            ds = case.make(study, series[number % 2], number, f"PAT-{n}")
            if case.change:
                case.change(ds)
            path = folder / f"case{n:02d}" / f"{number:05d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        studies[study] = (case, paths)
    return studies


def _send(port: int, paths: list[Path]) -> None:
    """Every file over one association (C-STORE), each answered Success."""
    assoc = associate(port, paths[:1])
    assert assoc.is_established
    try:
        for path in paths:
            assert assoc.send_c_store(path).Status == 0x0000, path
    finally:
        assoc.release()


class Service:
    """A registry and a gateway publishing to it, with the studies sent and settled."""

    def __init__(self, folder: Path, studies: dict[str, tuple[Case, list[Path]]],
                 **settings: str) -> None:
        self.studies = studies
        self.registry = RegistryProcess(folder / "registry").start()
        self.server = PasserelleProcess(folder / "data", registry_url=self.registry.fhir_url,
                                        **FAST, **settings).start()
        self.index = Index(folder / "data" / "index.sqlite")
        self.outbox = Outbox(self.index)
        try:
            for _, paths in studies.values():
                _send(self.server.dicom_port, paths)
            self.settle(len(studies))
        except BaseException:
            self.close()
            raise

    def rows(self, study: str) -> list[Publication]:
        return [row for row in self.outbox.listing() if row.study_uid == study]

    def settle(self, count: int) -> None:
        """Wait until ``count`` rows are acknowledged or failed."""
        def settled() -> bool:
            done = [r for r in self.outbox.listing()
                    if r.state in (State.ACKNOWLEDGED, State.FAILED)]
            return len(done) >= count
        wait_for(settled, 120, f"{count} publications to settle")

    def documents(self, study: str) -> list[tuple[dict, bytes]]:
        """The DocumentReferences of ``study`` in the registry (ITI-67, any patient
        identifier the gateway may have used) and the KOS each one carries (ITI-68)."""
        found: dict[str, dict] = {}
        patient = str(dcmread(self.studies[study][1][0], stop_before_pixels=True).PatientID)
        for system, value in (INS, (f"urn:oid:{ISSUERS['patient_id_issuer_oid']}", patient)):
            response = httpx.get(f"{self.registry.fhir_url}/DocumentReference", params={
                "patient.identifier": f"{system}|{value}", "status": "current,superseded",
                "related:identifier": study}).raise_for_status()
            found |= {e["resource"]["id"]: e["resource"] for e in response.json()["entry"]}
        return [(document, httpx.get(document["content"][0]["attachment"]["url"])
                 .raise_for_status().content) for document in found.values()]

    def close(self) -> None:
        self.server.stop()
        self.index.close()
        self.registry.stop()  # checks everything it received (tests/conformance/registry)


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("default")
    service = Service(folder, _studies(folder / "studies", CASES))
    yield service
    service.close()


@pytest.fixture(scope="module")
def issuers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("issuers")
    service = Service(folder, _studies(folder / "studies", CASES), **ISSUERS)
    yield service
    service.close()


def _problems(document: dict, kos: bytes, instances: list[Path]) -> list[str]:
    return [*kos_problems(kos, instances),
            *(f"profile: {p}" for p in profile_problems(document, DOCUMENT_PROFILE)),
            *(f"metadata vs KOS: {p}" for p in metadata_problems(document, kos,
                                                                 instances=instances))]


def _check_case(service: Service, name: str, refused: str) -> None:
    [(study, (_, paths))] = [(uid, entry) for uid, entry in service.studies.items()
                             if entry[0].name == name]
    rows, documents = service.rows(study), service.documents(study)
    if refused:
        assert [row.state for row in rows] == [State.FAILED], rows
        reason = rows[0].last_error
        assert refused in reason.lower() and not reason.startswith("HTTP"), (
            f"expected a refusal by the gateway naming the {refused}, before sending: "
            f"{reason!r}")
        assert documents == []
        return
    assert [row.state for row in rows] == [State.ACKNOWLEDGED], [
        (row.state, row.last_error) for row in rows]
    [(document, kos)] = documents
    problems = _problems(document, kos, paths)
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_embedded_default(default: Service, name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    _check_case(default, name, case.refused_by_default)


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_every_issuer_configured(issuers: Service, name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    _check_case(issuers, name, case.refused_with_issuers)


def test_a_late_instance_is_published_as_a_conformant_replacement(default: Service,
                                                                  tmp_path: Path) -> None:
    [(study, (_, paths))] = [(uid, entry) for uid, entry in default.studies.items()
                             if entry[0].name == "national identifiers"]
    first = default.rows(study)[0]
    late = _national(study, generate_uid(), 99,
                     str(dcmread(paths[0], stop_before_pixels=True).PatientID))
    late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    _send(default.server.dicom_port, [tmp_path / "late.dcm"])
    wait_for(lambda: len([r for r in default.rows(study)
                          if r.state is State.ACKNOWLEDGED]) == 2, 60, "the replacement")
    replacement = default.rows(study)[1]
    assert replacement.replaces_kos_uid == first.kos_uid
    documents = {d["masterIdentifier"]["value"]: (d, kos) for d, kos in default.documents(study)}
    document, kos = documents[f"urn:oid:{replacement.kos_uid}"]
    assert document["relatesTo"][0]["code"] == "replaces"
    problems = _problems(document, kos, [*paths, tmp_path / "late.dcm"])
    assert not problems, "replacement:\n  " + "\n  ".join(problems)


def test_the_kos_names_the_ae_title_that_serves_query_retrieve(default: Service) -> None:
    """The KOS advertises only what exists (finding 7): its Retrieve AE Title is the AE
    that indeed answers a C-FIND for the study (PS3.3 C.17.2.1)."""
    [(study, _)] = [(uid, entry) for uid, entry in default.studies.items()
                    if entry[0].name == "national identifiers"]
    kos = dcmread(BytesIO(default.documents(study)[0][1]))
    series = [item for study_item in kos.CurrentRequestedProcedureEvidenceSequence
              for item in study_item.ReferencedSeriesSequence]
    assert series and all(item.RetrieveAETitle == "PASSERELLE" and item.RetrieveURL
                          for item in series)
    ae = AE(ae_title="CHECKS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", default.server.dicom_port, ae_title="PASSERELLE")
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = ""
        found = {str(identifier.SeriesInstanceUID) for status, identifier
                 in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                 if status and status.Status in (0xFF00, 0xFF01)}
    finally:
        assoc.release()
    # (an earlier test may have added a series since: a later manifest references it)
    assert {str(item.SeriesInstanceUID) for item in series} <= found


def test_an_order_without_its_authority_is_left_out_of_the_metadata_with_a_warning(
        default: Service) -> None:
    """The embedded default names no order authority: the study is published all the same,
    its KOS keeps the order as the instances carry it, the registry metadata leave it out,
    and each publication warns once, naming the setting."""
    [(study, _)] = [(uid, entry) for uid, entry in default.studies.items()
                    if entry[0].name == "national identifiers"]
    published = [row for row in default.rows(study) if row.state is State.ACKNOWLEDGED]
    assert published
    for document, data in default.documents(study):
        [request] = dcmread(BytesIO(data)).ReferencedRequestSequence
        assert request.PlacerOrderNumberImagingServiceRequest == "CMD-2026-88812"
        assert "OrderPlacerIdentifierSequence" not in request
        assert "CMD-2026-88812" not in json.dumps(document["context"]["related"])
    warnings = [line for line in default.server.log().splitlines()
                if study in line and "order_issuer_oid" in line]
    assert len(warnings) == len(published), warnings
    assert all("WARNING" in line and "'CMD-2026-88812'" in line for line in warnings), warnings


@pytest.mark.slow
def test_two_thousand_instances(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("large")
    studies = _studies(folder / "studies", [Case("2000 instances", _national, count=LARGE)])
    service = Service(folder, studies)
    try:
        _check_case(service, "2000 instances", "")
    finally:
        service.close()


HAND_WRITTEN = Path(__file__).parent / "data" / "fixtures" / "iti65-kos-bundle.json"


def _document(bundle: dict) -> dict:
    return next(e["resource"] for e in bundle["entry"]
                if e["resource"]["resourceType"] == "DocumentReference")


@pytest.mark.parametrize(("change", "expected"), [
    pytest.param(*case, id=case[1]) for case in [
    (lambda b: _document(b).pop("custodian"), "custodian: cardinality"),
    (lambda b: b["entry"][0]["resource"].__setitem__("mode", "snapshot"), "patternCode"),
    (lambda b: _document(b)["contained"].append({"resourceType": "Patient", "id": "x"}),
     "dom-3"),
    (lambda b: _document(b)["relatesTo"].__setitem__(0, {"code": "replace", "target": {
        "reference": "DocumentReference/1"}}) if "relatesTo" in _document(b) else
     _document(b).__setitem__("relatesTo", [{"code": "replace", "target": {
         "reference": "DocumentReference/1"}}]), "document-relationship-type"),
    (lambda b: next(r["identifier"] for r in _document(b)["context"]["related"]
                    if "accession" in json.dumps(r)).pop("system"), "assigning authority"),
    # The KOS gives the order with its OrderPlacerIdentifierSequence: the metadata must too.
    (lambda b: next(r["identifier"] for r in _document(b)["context"]["related"]
                    if "xds:2013:order" in json.dumps(r)).pop("system"),
     "referenceIdList orders [('', 'CMD-2026-88812')]"),
    (lambda b: _document(b)["context"]["related"].pop(),
     "referenceIdList orders [] != the KOS's"),
    (lambda b: _document(b)["content"][0]["attachment"].__setitem__("hash", "AAAA"),
     "attachment.hash is not the SHA-1"),
    (lambda b: _document(b)["subject"].__setitem__("identifier", {
        "system": "urn:oid:1.2.250.1.999.1.1.1", "value": "PAT001"}), "is not the INS"),
    ]])
def test_the_checkers_find_what_they_look_for(change: Callable[[dict], object],
                                              expected: str) -> None:
    """Each check fails on a bundle broken in its own way (the hand-written fixture, altered)."""
    bundle = json.loads(HAND_WRITTEN.read_text())
    change(bundle)
    problems = bundle_problems(bundle)
    assert any(expected in problem for problem in problems), problems


def _hand_written_kos() -> Dataset:
    bundle = json.loads(HAND_WRITTEN.read_text())
    binary = next(e["resource"] for e in bundle["entry"]
                  if e["resource"]["resourceType"] == "Binary")
    return dcmread(BytesIO(base64.b64decode(binary["data"])))


def _encoded(kos: Dataset) -> bytes:
    out = BytesIO()
    kos.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_dciodvfy_finds_an_empty_issuer_sequence() -> None:
    kos = _hand_written_kos()
    kos.IssuerOfAccessionNumberSequence = Sequence()
    assert any("IssuerOfAccessionNumberSequence" in p and "Error" in p
               for p in kos_problems(_encoded(kos), []))


def test_a_retrieve_url_is_accepted_in_the_series_items_only() -> None:
    """The accepted "not in the IOD" warning is the Referenced Series items' Retrieve URL
    (XDS-I.b), not the same attribute anywhere else."""
    kos = _hand_written_kos()
    kos.RetrieveURL = "https://imagerie.example.org/dicom-web/studies/1.2.3"
    assert any("RetrieveURL" in p for p in kos_problems(_encoded(kos), []))


@pytest.mark.parametrize(("settings", "name", "replaces"), [
    pytest.param(settings, name, replaces, id=f"{label}: {name}{' (replacement)' * bool(replaces)}")
    for label, settings, name, replaces in [
        ("default", {}, "national identifiers", ""),
        ("default", {}, "national identifiers", "DocumentReference/1"),
        ("issuers", ISSUERS, "national identifiers", ""),
        ("issuers", ISSUERS, "no issuer at all", ""),
        ("issuers", ISSUERS, "several requests", "")]])
def test_the_bundle_built_in_process_passes_the_bundle_profile(
        make_web: Callable[..., InProcessService], tmp_path: Path, settings: dict[str, str],
        name: str, replaces: str) -> None:
    """The whole ITI-65 Bundle as the publisher builds it (the registry keeps only its
    resources): the PDSm bundle profile with its entry slices (a replacement's PATCH entry
    included), and its KOS."""
    web = make_web(**settings)
    [(study, (_, paths))] = _studies(tmp_path / "studies",
                                     [c for c in CASES if c.name == name]).items()
    web.ingest_all(paths)
    contents = load_study_contents(web.store.index, study)
    assert contents is not None
    producer = web.settings.producer
    origin = RetrieveOrigin(web.settings.http.public_url, producer.gateway_oid,
                            producer.organization_name)
    events, unmapped = load_event_codes().codes([s.modality for s in contents.series],
                                                [s.body_part for s in contents.series])
    assert unmapped == []
    bundle = provide_document_bundle(
        build_manifest(contents, origin, issuers_from_settings(producer)),
        producer_from_settings(producer), events, producer.default_confidentiality(),
        replaces=replaces)
    assert_bundle_conformant(bundle, paths)


def test_what_the_profile_check_cannot_decide_offline() -> None:
    """The rules the vendored profiles name but that need definitions not available offline
    (MHD value sets and identifier profiles): known, listed here, not passed silently."""
    checker = Checker(vendored())
    assert checker.check(json.loads(HAND_WRITTEN.read_text()), BUNDLE_PROFILE) == []
    assert checker.unchecked == {
        "required binding of DocumentReference.status to "
        "https://profiles.ihe.net/ITI/MHD/ValueSet/DocumentReferenceStats: its codes are not "
        "available offline",
        "required binding of List.code to https://profiles.ihe.net/ITI/MHD/ValueSet/"
        "MHDlistTypesVS: its codes are not available offline",
        "slice DocumentReference.identifier:entryUUID: discriminator value use is fixed in a "
        "profile that is not vendored",
        "slice List.identifier:entryUUID: discriminator value use is fixed in a profile that "
        "is not vendored",
        "slice List.identifier:uniqueId: discriminator value use is fixed in a profile that is "
        "not vendored"}
