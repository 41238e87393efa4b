"""IHE RAD IOCM against a running ``passerelle serve`` (and ``passerelle registry``): a
rejection note (Rejection Note Stored [RAD-66]) sent by C-STORE or STOW-RS takes the
instances it names out of QIDO-RS, WADO-RS, WADO-URI and the published manifest, which is
replaced or withdrawn through the outbox; audited and counted; a rejected instance sent again
is refused (retention expiry aside); notes that cannot apply are refused whole. And a study
sent again with one more series, then a corrected patient, replaces its manifest."""

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import text

from storage.database import Database
from storage.index import Index
from storage.outbox import Action, Outbox, Publication, State
from tests.conformance.dicom3tools import kos_problems
from tests.processes import PasserelleProcess, RegistryProcess, wait_for
from tests.scu import send
from tests.synthetic import ct_slice, national_ct_slice

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
FAST = {"stable_seconds": "1", "publish_retry_seconds": "0.2", "publish_retry_max_seconds": "1",
        "registry_timeout": "2", "order_issuer_oid": "1.2.250.1.999.1.1.3"}
TITLES = {"113001": "Rejected for Quality Reasons",
          "113037": "Rejected for Patient Safety Reasons",
          "113038": "Incorrect Modality Worklist Entry",
          "113039": "Data Retention Policy Expired"}


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def rejection_note(of: Dataset, code: str, rejected: list[Dataset],
                   modifier: tuple[str, str] | None = None, study_uid: str = "") -> Dataset:
    """A Key Object Selection Document (PS3.3 A.35.4, TID 2010) titled ``code`` (CID 7010)
    in a series of its own of the study of ``of`` (its patient and study modules), naming
    ``rejected`` in its Current Requested Procedure Evidence Sequence (by the study each
    says, or ``study_uid``) and its content; ``modifier``: a Document Title Modifier
    (113011), from CID 7011 for a quality rejection."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = KOS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                    "PatientSex", "OtherPatientIDsSequence", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        if keyword in of:
            setattr(ds, keyword, of[keyword].value)
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "KO", generate_uid(), 900
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.ContentDate, ds.ContentTime = "20260111", "090000"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code(code, TITLES[code])])
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = Sequence([template])
    by_study: dict[str, dict[str, list[Dataset]]] = {}
    for item in rejected:
        by_study.setdefault(study_uid or item.StudyInstanceUID, {}).setdefault(
            item.SeriesInstanceUID, []).append(item)
    evidence, content = [], []
    if modifier:
        item = Dataset()
        item.RelationshipType, item.ValueType = "HAS CONCEPT MOD", "CODE"
        item.ConceptNameCodeSequence = Sequence([_code("113011", "Document Title Modifier")])
        item.ConceptCodeSequence = Sequence([_code(*modifier)])
        content.append(item)
    for study, series in by_study.items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study
        series_items = []
        for series_uid, items in series.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series_uid
            series_item.ReferencedSOPSequence = Sequence([_reference(i) for i in items])
            series_items.append(series_item)
            for i in items:
                entry = Dataset()
                entry.RelationshipType, entry.ValueType = "CONTAINS", "IMAGE"
                entry.ReferencedSOPSequence = Sequence([_reference(i)])
                content.append(entry)
        study_item.ReferencedSeriesSequence = Sequence(series_items)
        evidence.append(study_item)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence(evidence)
    ds.ContentSequence = Sequence(content)
    return ds


def _reference(item: Dataset) -> Dataset:
    reference = Dataset()
    reference.ReferencedSOPClassUID = item.SOPClassUID
    reference.ReferencedSOPInstanceUID = item.SOPInstanceUID
    return reference


class _Outbox:
    """The outbox of a service's index, read as the service writes it; ``settings``: the
    service's database and FAST."""

    def __init__(self, data_dir: Path, database_url: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.index = Index(Database(database_url or f"sqlite:///{data_dir / 'index.sqlite'}"))
        self.outbox = Outbox(self.index)
        self.settings = {**FAST, "database_url": database_url}

    def acknowledged(self, count: int, what: str) -> list[Publication]:
        def done() -> bool:
            rows = self.outbox.listing()
            assert not [r for r in rows if r.state is State.FAILED], rows
            return sum(r.state is State.ACKNOWLEDGED for r in rows) >= count
        wait_for(done, 30, what)
        return [r for r in self.outbox.listing() if r.state is State.ACKNOWLEDGED]


@pytest.fixture
def outbox(tmp_path: Path, database_url: str) -> Iterator[_Outbox]:
    """On SQLite the default index (the data dir's file), else a PostgreSQL database."""
    reader = _Outbox(tmp_path / "data", "" if database_url.startswith("sqlite") else
                     database_url)
    yield reader
    reader.index.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(tmp_path / "registry") as process:
        yield process


def _store(server: PasserelleProcess, datasets: list[Dataset]) -> None:
    for ds in datasets:
        assert send(server.dicom_port, ds) == (0x0000, ""), ds.SOPInstanceUID


def _manifest_references(server: PasserelleProcess, study: str, kos_uid: str) -> set[str]:
    """The SOP Instance UIDs of a published manifest (the bytes kept under manifests/),
    which dciodvfy and dcentvfy accept."""
    path = server.data_dir / "manifests" / study / f"{kos_uid}.dcm"
    manifest = dcmread(path)
    instances = [server.data_dir / "studies" / study / series.SeriesInstanceUID /
                 f"{ref.ReferencedSOPInstanceUID}.dcm"
                 for item in manifest.CurrentRequestedProcedureEvidenceSequence
                 for series in item.ReferencedSeriesSequence
                 for ref in series.ReferencedSOPSequence]
    assert kos_problems(path.read_bytes(), instances) == []
    return {p.stem for p in instances}


def _listed(server: PasserelleProcess, study: str) -> set[str]:
    """The SOP Instance UIDs QIDO-RS lists in a study."""
    response = httpx.get(f"{server.base_url}/dicom-web/studies/{study}/instances")
    if response.status_code == 204:
        return set()
    return {item["00080018"]["Value"][0] for item in response.raise_for_status().json()}


def _wado(server: PasserelleProcess, ds: Dataset) -> tuple[int, int]:
    """The statuses of WADO-RS and WADO-URI for one instance."""
    rs = httpx.get(f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
                   f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    uri = httpx.get(f"{server.base_url}/wado", params={
        "requestType": "WADO", "studyUID": ds.StudyInstanceUID,
        "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID,
        "contentType": "application/dicom"})
    return rs.status_code, uri.status_code


def _file(server: PasserelleProcess, ds: Dataset, top: str = "studies") -> Path:
    return (server.data_dir / top / ds.StudyInstanceUID / ds.SeriesInstanceUID /
            f"{ds.SOPInstanceUID}.dcm")


def _rejection_events(server: PasserelleProcess, note: Dataset) -> list[dict]:
    """The audit messages of the rejection applied by ``note``."""
    path = server.data_dir / "audit" / "audit.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in events if e["EventIdentification"]["EventID"]["csd-code"] == "110103"
            and note.SOPInstanceUID in json.dumps(e)]


def test_rejections_replace_then_withdraw_the_manifest(
        tmp_path: Path, outbox: _Outbox, registry: RegistryProcess) -> None:
    study, kept_series, rejected_series = generate_uid(), generate_uid(), generate_uid()
    kept = [national_ct_slice(study, kept_series, 1, n) for n in (1, 2)]
    rejected = [national_ct_slice(study, rejected_series, 2, n) for n in (1, 2)]
    with PasserelleProcess(tmp_path / "data", registry_url=registry.fhir_url,
                           **outbox.settings) as server:
        _store(server, kept + rejected)
        [first] = outbox.acknowledged(1, "the first publication")
        assert _manifest_references(server, study, first.kos_uid) == {
            ds.SOPInstanceUID for ds in kept + rejected}

        note = rejection_note(kept[0], "113037", rejected)
        assert send(server.dicom_port, note) == (0x0000, "")
        # Out of use at once: QIDO-RS, WADO-RS and WADO-URI (404: PS3.18 lets a server not
        # disclose that a resource existed), files and index rows gone.
        assert _listed(server, study) == {ds.SOPInstanceUID for ds in kept} | {
            note.SOPInstanceUID}
        for ds in rejected:
            assert _wado(server, ds) == (404, 404)
            assert not _file(server, ds).exists() and not _file(server, ds, "rejected").exists()
        assert _wado(server, kept[0]) == (200, 200)
        assert _wado(server, note) == (200, 200)  # the note is evidence: stored

        second = outbox.acknowledged(2, "the replacement")[1]
        assert second.action is Action.PUBLISH
        assert second.replaces_kos_uid == first.kos_uid != second.kos_uid
        assert _manifest_references(server, study, second.kos_uid) == {
            ds.SOPInstanceUID for ds in kept}  # neither the rejected nor the note
        assert [d["id"] for d in registry.documents(study, "current")] == [
            second.document_id.split("/")[1]]
        wait_for(lambda: _rejection_events(server, note), 10, "the audit event")
        [event] = _rejection_events(server, note)
        assert event["EventIdentification"]["EventActionCode"] == "D"
        assert event["ActiveParticipant"][0]["UserID"] == "TESTSCU"
        text = json.dumps(event)
        assert "113037" in text and "2 instance(s) removed" in text and study in text
        assert server.metric("passerelle_rejected_instances_total", reason="113037",
                             action="removed") == 2

        # Sent again: refused, IHE RAD-66 4.66.4.2.3.1 (not shown again).
        status, comment = send(server.dicom_port, rejected[0])
        assert status == 0xC512 and comment.startswith("rejected (113037")
        assert send(server.dicom_port, note) == (0x0000, "")  # the note again: a duplicate
        assert len(_rejection_events(server, note)) == 1

        # Everything left rejected (retention expiry): the manifest is withdrawn.
        expiry = rejection_note(kept[0], "113039", kept)
        assert send(server.dicom_port, expiry) == (0x0000, "")
        third = outbox.acknowledged(3, "the withdrawal")[2]
        assert third.action is Action.UNPUBLISH and third.kos_uid == second.kos_uid
        assert registry.documents(study, "current") == []
        assert _listed(server, study) == {note.SOPInstanceUID, expiry.SOPInstanceUID}
        assert not any(_file(server, ds).exists() for ds in kept)
        wait_for(lambda: _rejection_events(server, expiry), 10, "the audit event")
        assert "withdrawal" in json.dumps(_rejection_events(server, expiry))

        # Retention expiry stays in force for an instance sent again (4.66.4.4.3 lets the
        # archive lift it; this one does not: a PACS retrieval would bring it back unasked).
        status, comment = send(server.dicom_port, kept[0])
        assert status == 0xC512 and comment.startswith("rejected (113039")
        assert kept[0].SOPInstanceUID not in _listed(server, study)


def test_quality_rejection_hides_and_misplaced_notes_are_refused(tmp_path: Path,
                                                                 outbox: _Outbox) -> None:
    study, series = generate_uid(), generate_uid()
    slices = [ct_slice(study, series, 1, n, size=8) for n in (1, 2, 3)]
    other = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8, patient_id="PAT999")
    with PasserelleProcess(tmp_path / "data", stable_seconds="3600",
                           database_url=outbox.settings["database_url"]) as server:
        _store(server, [*slices, other])

        note = rejection_note(slices[0], "113001", [slices[0]], ("111209", "Positioning"))
        assert send(server.dicom_port, note) == (0x0000, "")
        assert _listed(server, study) == {slices[1].SOPInstanceUID, slices[2].SOPInstanceUID,
                                          note.SOPInstanceUID}
        assert _wado(server, slices[0]) == (404, 404)
        kept = _file(server, slices[0], "rejected")  # hidden, not deleted
        assert not _file(server, slices[0]).exists() and kept.exists()
        assert dcmread(kept).SOPInstanceUID == slices[0].SOPInstanceUID
        assert send(server.dicom_port, slices[0])[0] == 0xC512
        wait_for(lambda: _rejection_events(server, note), 10, "the audit event")
        [event] = _rejection_events(server, note)
        assert event["EventIdentification"]["EventActionCode"] == "U"
        assert "1 hidden" in json.dumps(event)

        # By STOW-RS, naming an instance this gateway never received: recorded, so that it
        # is refused when it arrives (IHE RAD-66 4.66.4.3.3).
        unknown = ct_slice(study, generate_uid(), 2, 1, size=8)
        worklist = rejection_note(slices[0], "113038", [slices[1], unknown])
        stored = DICOMwebClient(url=f"{server.base_url}/dicom-web").store_instances(
            [worklist])
        assert "FailedSOPSequence" not in stored
        assert not _file(server, slices[1]).exists()
        assert not _file(server, slices[1], "rejected").exists()
        status, comment = send(server.dicom_port, unknown)
        assert status == 0xC512 and comment.startswith("rejected (113038")
        assert server.metric("passerelle_rejected_instances_total", reason="113038",
                             action="not_stored") == 1

        # Refused whole, nothing stored: another patient's study, its series said to be of
        # this study, an instance placed in a series it is not in, no reference at all.
        misplaced = copy.deepcopy(slices[2])
        misplaced.SeriesInstanceUID = generate_uid()
        refused = [(rejection_note(slices[2], "113037", [other]), 0xC513,
                    "another study than its own"),
                   (rejection_note(slices[2], "113037", [other], study_uid=study), 0xC513,
                    "a series of another study"),
                   (rejection_note(slices[2], "113037", [misplaced]), 0xC513,
                    "stored in another series"),
                   (rejection_note(slices[2], "113037", []), 0xA900, "references no instance")]
        for bad, code, why in refused:
            status, comment = send(server.dicom_port, bad)
            assert status == code and why in comment, comment
            assert bad.SOPInstanceUID not in _listed(server, study)
        assert _wado(server, other) == (200, 200) and _wado(server, slices[2]) == (200, 200)
        assert server.metric("passerelle_ingest_failures_total", protocol="dimse",
                             reason="rejection-note-outside-study") == 3


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=False)
def test_a_study_sent_again_changed_replaces_its_manifest(
        tmp_path: Path, outbox: _Outbox, registry: RegistryProcess) -> None:
    study, first_series, second_series = generate_uid(), generate_uid(), generate_uid()
    before = [national_ct_slice(study, first_series, 1, n) for n in (1, 2)]
    added = [national_ct_slice(study, second_series, 2, n) for n in (1, 2)]
    with PasserelleProcess(tmp_path / "data", registry_url=registry.fhir_url,
                           duplicate_policy="overwrite", **outbox.settings) as server:
        _store(server, before)
        [first] = outbox.acknowledged(1, "the first publication")
        _store(server, added)  # updated in the PACS: one more series
        second = outbox.acknowledged(2, "the replacement")[1]
        assert second.replaces_kos_uid == first.kos_uid
        assert _manifest_references(server, study, second.kos_uid) == {
            ds.SOPInstanceUID for ds in before + added}

        # The patient's name corrected at the RIS, the study sent again.
        corrected = [copy.deepcopy(ds) for ds in before + added]
        for ds in corrected:
            ds.PatientName = "DUPONT^JEAN^PIERRE"
        _store(server, corrected)
        third = outbox.acknowledged(3, "the second replacement")[2]
        assert third.replaces_kos_uid == second.kos_uid
        manifest = dcmread(server.data_dir / "manifests" / study / f"{third.kos_uid}.dcm")
        assert str(manifest.PatientName) == "DUPONT^JEAN^PIERRE"
        assert [d["id"] for d in registry.documents(study, "current")] == [
            third.document_id.split("/")[1]]


def test_a_rejection_interrupted_by_a_crash_is_finished_at_start(tmp_path: Path,
                                                                  outbox: _Outbox) -> None:
    study, series = generate_uid(), generate_uid()
    slices = [ct_slice(study, series, 1, n, size=8) for n in (1, 2, 3)]
    database = {"database_url": outbox.settings["database_url"]}
    with PasserelleProcess(tmp_path / "data", stable_seconds="3600", **database) as server:
        _store(server, slices)
    # What a crash after the rejection's first transaction leaves: rows, instances indexed.
    with outbox.index.transaction() as db:
        for ds, reason in ((slices[0], "113037"), (slices[1], "113001")):
            db.execute(text("INSERT INTO rejected_instances VALUES (:sop, :study, :series,"
                            " :reason, :note, 0)"),
                       {"sop": ds.SOPInstanceUID, "study": study, "series": series,
                        "reason": reason, "note": generate_uid()})
    with PasserelleProcess(tmp_path / "data", stable_seconds="3600", **database) as server:
        assert _listed(server, study) == {slices[2].SOPInstanceUID}
        assert not _file(server, slices[0]).exists()
        assert not _file(server, slices[1]).exists()
        assert _file(server, slices[1], "rejected").exists()
        assert "a rejection interrupted earlier finished" in server.log()
