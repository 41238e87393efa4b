"""Retrieval on demand: a study whose local copy was removed as retention removes it (files
deleted, ``copy_removed_at`` set) is retrieved again from Orthanc as the PACS by the first
WADO-RS or WADO-URI request, once however many ask at once (across HTTP workers), and served
as it was stored; with the PACS frozen or down the client gets a 503 with Retry-After."""

import io
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from sqlalchemy import text

from gateway.dicom.peer import DicomPeer
from gateway.pacs import PacsConfig
from gateway.pacs.restore import Restorer
from storage.index import Index
from storage.part10 import dataset_bytes
from storage.store import Store
from tests.multipart import parts_of
from tests.orthanc import OrthancProcess
from tests.processes import PasserelleProcess, free_port, wait_for
from tests.scu import send
from tests.synthetic import write_ct_study

WAIT_SECONDS = 5
STUDY_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class _Setup:
    def __init__(self, tmp: Path) -> None:
        dicom_port = free_port()
        self.orthanc = OrthancProcess(tmp / "orthanc", {
            "PASSERELLE": DicomPeer("PASSERELLE", "127.0.0.1", dicom_port)}).start()
        self.server = PasserelleProcess(
            tmp / "data", dicom_port=str(dicom_port), pacs=str(self.orthanc.peer()),
            http_workers="3", retrieve_wait_seconds=str(WAIT_SECONDS)).start()
        files = write_ct_study(tmp / "study", series=2, per_series=5, size=32)
        for path in files:
            assert send(self.server.dicom_port, path)[0] == 0x0000
            self.orthanc.upload(path)
        self.study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        self.index = Index(tmp / "data" / "index.sqlite")
        self.data_dir = tmp / "data"
        self.originals = {i.sop_uid: (self.data_dir / i.path).read_bytes()
                          for i in self.index.instances(self.study)}

    def purge(self) -> None:
        """Remove the local copy as retention does: the files, then the study's row says
        so (and which PACS holds it)."""
        for instance in self.index.instances(self.study):
            (self.data_dir / instance.path).unlink()
        with self.index.transaction() as db:
            db.execute(text("UPDATE studies SET copy_removed_at = :now, copy_held_by = :by"
                            " WHERE study_uid = :study"),
                       {"now": time.time(), "by": self.orthanc.ae_title, "study": self.study})

    def removed_at(self) -> float | None:
        return self.index.copy_state(self.study)[0]

    def get(self, path: str, **headers: str) -> httpx.Response:
        return httpx.get(f"{self.server.base_url}{path}", headers=headers, timeout=60)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Setup]:
    running = _Setup(tmp_path_factory.mktemp("on-demand"))
    try:
        yield running
    finally:
        running.server.stop()
        running.orthanc.stop()
        running.index.close()


def _meta(data: bytes) -> FileMetaDataset:
    return dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta


def _same_object(served: bytes, original: bytes) -> None:
    """The data set byte for byte, and the file meta but for (0002,0016) Source AE Title,
    which names the sender of each copy (PS3.10 7.1)."""
    assert bytes(dataset_bytes(served)) == bytes(dataset_bytes(original))
    metas = [_meta(data) for data in (served, original)]
    for meta in metas:
        meta.pop("SourceApplicationEntityTitle", None)
        meta.pop("FileMetaInformationGroupLength", None)
    assert metas[0] == metas[1]


def test_wado_rs_restores_the_study_as_stored(setup: _Setup) -> None:
    setup.purge()
    assert setup.removed_at() is not None
    answer = setup.get(f"/dicom-web/studies/{setup.study}", accept=STUDY_ACCEPT)
    assert answer.status_code == 200, answer.text
    parts = [body for _, body in parts_of(answer)]
    assert len(parts) == len(setup.originals)
    served = {str(_meta(p).MediaStorageSOPInstanceUID): p
              for p in parts}
    assert served.keys() == setup.originals.keys()
    for sop_uid, original in setup.originals.items():
        _same_object(served[sop_uid], original)
    assert setup.removed_at() is None
    for instance in setup.index.instances(setup.study):  # stored again, in place
        _same_object((setup.data_dir / instance.path).read_bytes(),
                     setup.originals[instance.sop_uid])
        assert instance.size == (setup.data_dir / instance.path).stat().st_size


def test_concurrent_requests_trigger_one_retrieval(setup: _Setup) -> None:
    setup.purge()
    restored = setup.server.metric("passerelle_pacs_restores_total", result="restored")
    associations = setup.server.metric("passerelle_dicom_associations_total",
                                       outcome="released")
    instances = setup.index.instances(setup.study)
    paths = [f"/dicom-web/studies/{setup.study}"] * 4 + [
        f"/dicom-web/studies/{i.study_uid}/series/{i.series_uid}/instances/{i.sop_uid}"
        for i in instances[:8]]
    answers: list[httpx.Response] = []
    start = threading.Barrier(len(paths) + 1)
    # This test's process asks too, as another process of the service would (the DIMSE
    # side): the lock of the study is shared with the service's HTTP workers.
    store = Store(setup.data_dir)
    here = Restorer(PacsConfig((setup.orthanc.peer(),), "PASSERELLE", 30, 30,
                               setup.data_dir), store)
    restored_here = REGISTRY.get_sample_value("passerelle_pacs_restores_total",
                                              {"result": "restored"}) or 0

    def ask(path: str) -> None:
        start.wait()
        answers.append(setup.get(path, accept=STUDY_ACCEPT))

    def ensure() -> None:
        start.wait()
        here.ensure_local(setup.study)

    threads = [threading.Thread(target=ask, args=(path,)) for path in paths]
    threads.append(threading.Thread(target=ensure))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * len(paths)
    for answer in answers:
        for _, body in parts_of(answer):
            uid = str(_meta(body).MediaStorageSOPInstanceUID)
            _same_object(body, setup.originals[uid])
    store.close()
    assert not here.missing(setup.index.instances(setup.study))
    # One C-MOVE: one retrieval counted (by the service or here), one association from
    # Orthanc sending the study.
    assert (setup.server.metric("passerelle_pacs_restores_total", result="restored") - restored
            + (REGISTRY.get_sample_value("passerelle_pacs_restores_total",
                                         {"result": "restored"}) or 0) - restored_here) == 1
    assert setup.server.metric("passerelle_dicom_associations_total",
                               outcome="released") == associations + 1


def test_wado_uri_restores_the_object(setup: _Setup) -> None:
    setup.purge()
    instance = setup.index.instances(setup.study)[3]
    answer = setup.get(f"/wado?requestType=WADO&studyUID={instance.study_uid}&seriesUID="
                       f"{instance.series_uid}&objectUID={instance.sop_uid}"
                       "&contentType=application/dicom")
    assert answer.status_code == 200, answer.text
    _same_object(answer.content, setup.originals[instance.sop_uid])
    assert setup.removed_at() is None


def test_metadata_not_cached_yet_restores_the_study(setup: _Setup) -> None:
    setup.purge()
    with setup.index.transaction() as db:  # as for instances stored but never asked for
        db.execute(text("DELETE FROM instance_metadata"))
    answer = setup.get(f"/dicom-web/studies/{setup.study}/metadata",
                       accept="application/dicom+json")
    assert answer.status_code == 200, answer.text
    assert {item["00080018"]["Value"][0] for item in answer.json()} == setup.originals.keys()
    assert setup.removed_at() is None


def _getscu(setup: _Setup, folder: Path) -> subprocess.CompletedProcess[str]:
    folder.mkdir()
    return subprocess.run(["getscu", "-S", "-aet", "VIEWER", "-aec", "PASSERELLE", "-od",
                           str(folder), "-k", "QueryRetrieveLevel=STUDY", "-k",
                           f"StudyInstanceUID={setup.study}", "127.0.0.1",
                           str(setup.server.dicom_port)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_c_get_restores_the_study_first(setup: _Setup, tmp_path: Path) -> None:
    setup.purge()
    run = _getscu(setup, tmp_path / "got")
    assert run.returncode == 0, run.stdout + run.stderr
    got = {ds.SOPInstanceUID: ds for ds in map(dcmread, (tmp_path / "got").iterdir())}
    assert got.keys() == setup.originals.keys()
    for sop_uid, original in setup.originals.items():
        assert got[sop_uid] == dcmread(io.BytesIO(original))  # every element
    assert setup.removed_at() is None


def test_a_frozen_pacs_gives_503_then_the_retrieval_completes(setup: _Setup) -> None:
    setup.purge()
    assert setup.orthanc.proc is not None
    os.kill(setup.orthanc.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        answer = setup.get(f"/dicom-web/studies/{setup.study}", accept=STUDY_ACCEPT)
    finally:
        os.kill(setup.orthanc.proc.pid, signal.SIGCONT)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == str(WAIT_SECONDS)
    assert f"not back within {WAIT_SECONDS} s" in answer.text
    # The retrieval went on without the client: the next request is served.
    wait_for(lambda: setup.removed_at() is None, 60, "the study retrieved in the background")
    again = setup.get(f"/dicom-web/studies/{setup.study}", accept=STUDY_ACCEPT)
    assert again.status_code == 200 and len(parts_of(again)) == len(setup.originals)


def test_a_pacs_down_gives_503_with_retry_after(setup: _Setup) -> None:
    setup.purge()
    setup.orthanc.stop()
    failed = setup.server.metric("passerelle_pacs_restore_waits_total", result="unavailable")
    answer = setup.get(f"/dicom-web/studies/{setup.study}", accept=STUDY_ACCEPT)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == str(WAIT_SECONDS)
    assert "could not be retrieved from the PACS" in answer.text
    assert "ORTHANC" in answer.text
    assert setup.removed_at() is not None
    assert setup.server.metric("passerelle_pacs_restore_waits_total",
                               result="unavailable") == failed + 1
    # The DIMSE side: the C-GET is refused, A702 with the reason, nothing sent.
    run = _getscu(setup, setup.data_dir.parent / "refused")
    assert "Refused: OutOfResourcesSubOperations" in run.stderr, run.stdout + run.stderr
    assert not list((setup.data_dir.parent / "refused").iterdir())
