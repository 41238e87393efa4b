"""The SCU towards PACS peers against real ones: Orthanc, and dcmtk's stricter dcmqrscp.

A study is loaded into each PACS; Passerelle (a running service, the C-MOVE destination)
finds it, lists its instances and retrieves it by C-MOVE and by C-GET, byte for byte."""

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway.dicom.pacs_client import (
    PacsError,
    find_studies,
    held_instances,
    retrieve_study,
)
from gateway.dicom.peer import DicomPeer, Retrieve
from storage.part10 import dataset_bytes
from storage.store import Store
from tests.dcmqrscp import DcmqrscpProcess
from tests.orthanc import OrthancProcess
from tests.processes import PasserelleProcess, free_port
from tests.synthetic import write_ct_study

AE = "PASSERELLE"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_study(tmp_path_factory.mktemp("pacs-study"), series=2, per_series=3)


@pytest.fixture(scope="module")
def passerelle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasserelleProcess]:
    process = PasserelleProcess(tmp_path_factory.mktemp("pacs-client") / "data").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, passerelle: PasserelleProcess,
            study: list[Path]) -> Iterator[OrthancProcess]:
    pacs = OrthancProcess(tmp_path_factory.mktemp("orthanc"), {
        "passerelle": DicomPeer(AE, "127.0.0.1", passerelle.dicom_port)}, dicomweb=False)
    pacs.start()
    for path in study:
        pacs.upload(path)
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory, passerelle: PasserelleProcess,
             study: list[Path]) -> Iterator[DcmqrscpProcess]:
    pacs = DcmqrscpProcess(tmp_path_factory.mktemp("dcmqrscp"), {
        "passerelle": DicomPeer(AE, "127.0.0.1", passerelle.dicom_port)}).start()
    pacs.load(study)
    yield pacs
    pacs.stop()


def _peers(orthanc: OrthancProcess, dcmqrscp: DcmqrscpProcess) -> list[DicomPeer]:
    return [orthanc.peer(), dcmqrscp.peer()]


def test_studies_are_found_by_uid_accession_and_patient_since(
        orthanc: OrthancProcess, dcmqrscp: DcmqrscpProcess, study: list[Path]) -> None:
    first = dcmread(study[0], stop_before_pixels=True)
    for peer in _peers(orthanc, dcmqrscp):
        by_uid = find_studies(peer, AE, study_uid=first.StudyInstanceUID)
        assert [match.study_uid for match in by_uid] == [first.StudyInstanceUID], peer
        assert by_uid[0].patient_id == first.PatientID
        assert by_uid[0].accession_number == first.AccessionNumber
        by_accession = find_studies(peer, AE, accession=first.AccessionNumber)
        assert [match.study_uid for match in by_accession] == [first.StudyInstanceUID], peer
        study_date = datetime.date.fromisoformat(first.StudyDate[:4] + "-" + first.StudyDate[4:6]
                                                 + "-" + first.StudyDate[6:])
        since = find_studies(peer, AE, patient_id=first.PatientID, since=study_date)
        assert [match.study_uid for match in since] == [first.StudyInstanceUID], peer
        later = study_date + datetime.timedelta(days=1)
        assert find_studies(peer, AE, patient_id=first.PatientID, since=later) == [], peer
    # Orthanc answers the optional study keys too.
    found = find_studies(orthanc.peer(), AE, study_uid=first.StudyInstanceUID)[0]
    assert found.modalities == ("CT",) and found.instance_count == len(study)


def test_held_instances_are_every_instance_of_the_study(
        orthanc: OrthancProcess, dcmqrscp: DcmqrscpProcess, study: list[Path]) -> None:
    expected = {(ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID)
                for ds in (dcmread(path, stop_before_pixels=True) for path in study)}
    study_uid = dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
    ct = dcmread(study[0], stop_before_pixels=True).SOPClassUID
    for peer in _peers(orthanc, dcmqrscp):
        held = held_instances(peer, AE, study_uid)
        # dcmqrscp does not return SOP Class UID at IMAGE level (not among its keys).
        assert {(h.sop_uid, h.series_uid, h.sop_class_uid or ct) for h in held} == expected, peer
        assert held_instances(peer, AE, "1.2.3.4.5.6.7") == []


def test_more_matches_than_the_limit_is_an_error(orthanc: OrthancProcess,
                                                 study: list[Path]) -> None:
    study_uid = dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
    with pytest.raises(PacsError, match="more than 2 matches"):
        held_instances(orthanc.peer(), AE, study_uid, limit=2)


def _stored_datasets(data_dir: Path, sop_uids: list[str]) -> dict[str, bytes]:
    store = Store(data_dir)
    try:
        found = {uid: store.index.find_instance(uid) for uid in sop_uids}
        return {uid: bytes(dataset_bytes((data_dir / item.path).read_bytes()))
                for uid, item in found.items() if item is not None}
    finally:
        store.close()


@pytest.mark.parametrize("source", ["orthanc", "dcmqrscp"])
def test_a_study_is_moved_into_the_running_service(
        source: str, request: pytest.FixtureRequest, passerelle: PasserelleProcess,
        study: list[Path]) -> None:
    pacs = request.getfixturevalue(source)
    originals = {dcmread(path).SOPInstanceUID: bytes(dataset_bytes(path.read_bytes()))
                 for path in study}
    study_uid = dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
    progress: list[tuple[int, int]] = []
    result = retrieve_study(pacs.peer(), AE, study_uid, None,  # type: ignore[arg-type]
                            on_progress=lambda done, total: progress.append((done, total)))
    assert (result.completed, result.failed, result.warning) == (len(study), 0, 0)
    assert _stored_datasets(passerelle.data_dir, list(originals)) == originals
    if progress:  # pending responses are optional (PS3.4 C.4.2.3.1)
        assert progress[-1][1] == len(study)


def test_a_study_is_got_byte_for_byte(tmp_path: Path, orthanc: OrthancProcess,
                                      study: list[Path]) -> None:
    originals = {dcmread(path).SOPInstanceUID: bytes(dataset_bytes(path.read_bytes()))
                 for path in study}
    study_uid = dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
    store = Store(tmp_path / "data")
    try:
        result = retrieve_study(orthanc.peer(Retrieve.GET), AE, study_uid, store)
    finally:
        store.close()
    assert (result.completed, result.failed) == (len(study), 0)
    assert _stored_datasets(tmp_path / "data", list(originals)) == originals


def test_a_peer_that_is_not_there_is_a_readable_error() -> None:
    peer = DicomPeer("GONE", "127.0.0.1", free_port())
    with pytest.raises(PacsError, match=r"GONE at 127\.0\.0\.1:\d+ could not be reached"):
        find_studies(peer, AE, study_uid="1.2.3", timeout=5)
