"""Issue 18 review: a PACS peer that misbehaves, against a running service.

The peer is a pynetdicom Study Root C-FIND / C-GET SCP on a loopback port (``HostilePacs``):
it lists the instances of the study asked for, then its C-GET sends what the test says,
instances of another study, or more instances than it listed."""

import json
from collections.abc import Iterator

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests.processes import PasserelleProcess, free_port
from tests.synthetic import ct_slice

PACS_AE = "HOSTILE"


class HostilePacs:
    """A C-FIND / C-GET SCP whose C-FIND answers ``listed``, whose C-GET sends ``sent``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listed: list[Dataset] = []
        self.sent: list[Dataset] = []
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian, scu_role=True,
                                 scp_role=True)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get)])

    def stop(self) -> None:
        self.server.shutdown()

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        asked = event.identifier
        level = asked.QueryRetrieveLevel
        seen: set[str] = set()
        for ds in self.listed:
            if ds.StudyInstanceUID != asked.StudyInstanceUID and asked.StudyInstanceUID:
                continue
            answer = Dataset()
            answer.QueryRetrieveLevel = level
            answer.StudyInstanceUID = ds.StudyInstanceUID
            if level == "STUDY":
                key = ds.StudyInstanceUID
                answer.PatientID, answer.AccessionNumber = ds.PatientID, ds.AccessionNumber
            elif level == "SERIES":
                key = answer.SeriesInstanceUID = ds.SeriesInstanceUID
            else:
                if ds.SeriesInstanceUID != asked.SeriesInstanceUID:
                    continue
                answer.SeriesInstanceUID = ds.SeriesInstanceUID
                key = answer.SOPInstanceUID = ds.SOPInstanceUID
                answer.SOPClassUID = ds.SOPClassUID
            if key not in seen:
                seen.add(key)
                yield 0xFF00, answer

    def _get(self, event: evt.Event) -> Iterator[object]:
        yield len(self.sent)
        for ds in self.sent:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds


@pytest.fixture(scope="module")
def pacs() -> Iterator[HostilePacs]:
    peer = HostilePacs()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pacs: HostilePacs
           ) -> Iterator[PasserelleProcess]:
    process = PasserelleProcess(tmp_path_factory.mktemp("review") / "data",
                                pacs=f"{PACS_AE}@127.0.0.1:{pacs.port}/get",
                                pacs_timeout="10").start()
    yield process
    process.stop()


def _study(count: int, patient_id: str = "PAT001") -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [ct_slice(study, series, 1, i, size=4, patient_id=patient_id)
            for i in range(1, count + 1)]


def _fetch(server: PasserelleProcess, study_uid: str) -> dict:
    with httpx.stream("POST", f"{server.base_url}/admin/fetch", timeout=60,
                      json={"study": study_uid}) as response:
        assert response.status_code == 200, response.read()
        events = [json.loads(line) for line in response.iter_lines() if line]
    assert events[-1]["event"] == "summary"
    return events[-1]


def _local(server: PasserelleProcess, study_uid: str) -> set[str]:
    found = httpx.get(f"{server.base_url}/dicom-web/studies/{study_uid}/instances")
    if found.status_code in (204, 404):
        return set()
    return {item["00080018"]["Value"][0] for item in found.raise_for_status().json()}


def test_a_c_get_stores_no_instance_of_another_study(server: PasserelleProcess,
                                                     pacs: HostilePacs) -> None:
    asked, other = _study(2), _study(2, patient_id="OTHER-PATIENT")
    pacs.listed, pacs.sent = asked, [other[0], asked[1]]
    summary = _fetch(server, asked[0].StudyInstanceUID)
    assert _local(server, asked[0].StudyInstanceUID) == {asked[1].SOPInstanceUID}
    # Another patient's study, never asked for, is not taken in (nor published).
    assert _local(server, other[0].StudyInstanceUID) == set()
    [outcome] = summary["studies"]
    assert (outcome["completed"], outcome["failed"]) == (1, 1) and not summary["complete"]
    assert "differs from the announced" in server.log()


def test_a_c_get_sending_more_than_the_peer_listed_is_cut_short(
        server: PasserelleProcess, pacs: HostilePacs) -> None:
    asked = _study(5)
    pacs.listed, pacs.sent = asked[:2], asked  # lists 2, sends 5
    summary = _fetch(server, asked[0].StudyInstanceUID)
    assert _local(server, asked[0].StudyInstanceUID) == {ds.SOPInstanceUID
                                                         for ds in asked[:2]}
    [outcome] = summary["studies"]
    assert "more instances than the 2 it listed" in outcome["error"]
