"""Issue 18 review: a PACS peer that misbehaves, against a running service.

The peer is a pynetdicom Study Root C-FIND / C-GET SCP on a loopback port (``HostilePacs``):
it lists the instances of the study asked for, then its C-GET sends what the test says,
instances of another study, or more instances than it listed, or is slow to; its C-MOVE
answers with pending responses without end."""

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.pacs.restore import MAX_RESTORES
from tests.processes import PasserelleProcess, RegistryProcess, free_port, wait_for
from tests.scu import send
from tests.synthetic import ct_slice, national_ct_slice
from tests.test_iocm import rejection_note

PACS_AE = "HOSTILE"
MOVING_AE = "HOSTILEMOVE"  # the same peer, by C-MOVE


class HostilePacs:
    """A C-FIND / C-GET SCP whose C-FIND answers ``listed``, whose C-GET sends ``sent``
    (None: the listed instances of the study asked for) once ``gate`` is open; whose C-MOVE
    to ``destination`` sends pending responses until the association ends."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listed: list[Dataset] = []
        self.sent: list[Dataset] | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.destination = ("127.0.0.1", 0)
        self.move_pending, self.moving = 0, False
        self.gets = 0
        self.find_failure = ""  # an Error Comment: the C-FIND fails (C000) with it
        self.in_flight = self.most_in_flight = 0
        self._counting = threading.Lock()
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian, scu_role=True,
                                 scp_role=True)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get),
            (evt.EVT_C_MOVE, self._move)])

    def stop(self) -> None:
        self.server.shutdown()

    def _find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        if self.find_failure:
            failure = Dataset()
            failure.Status, failure.ErrorComment = 0xC000, self.find_failure
            yield failure, None
            return
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
        with self._counting:
            self.in_flight += 1
            self.gets += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.gate.wait(30)
            study_uid = event.identifier.StudyInstanceUID
            sent = self.sent if self.sent is not None else [
                ds for ds in self.listed if ds.StudyInstanceUID == study_uid]
            yield len(sent)
            for ds in sent:
                if event.is_cancelled:
                    yield 0xFE00, None
                    return
                yield 0xFF00, ds
        finally:
            with self._counting:
                self.in_flight -= 1


    def _move(self, event: evt.Event) -> Iterator[object]:
        yield (*self.destination, {"contexts": [build_context(CTImageStorage)]})
        yield 3
        self.move_pending, self.moving = 0, True
        try:
            while event.assoc.is_established and self.move_pending < 100_000:
                self.move_pending += 1
                yield 0xFF00, "no data set"  # pynetdicom: a pending response, no C-STORE
        finally:
            self.moving = False


@pytest.fixture(scope="module")
def pacs() -> Iterator[HostilePacs]:
    peer = HostilePacs()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pacs: HostilePacs
           ) -> Iterator[PasserelleProcess]:
    process = PasserelleProcess(tmp_path_factory.mktemp("review") / "data",
                                pacs=f"{PACS_AE}@127.0.0.1:{pacs.port}/get,"
                                     f"{MOVING_AE}@127.0.0.1:{pacs.port}/move",
                                pacs_timeout="10", http_workers="2").start()
    pacs.destination = ("127.0.0.1", process.dicom_port)
    yield process
    process.stop()


def _study(count: int, patient_id: str = "PAT001") -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [ct_slice(study, series, 1, i, size=4, patient_id=patient_id)
            for i in range(1, count + 1)]


def _fetch(server: PasserelleProcess, study_uid: str, peer: str = PACS_AE) -> dict:
    with httpx.stream("POST", f"{server.base_url}/admin/fetch", timeout=60,
                      json={"study": study_uid, "peer": peer}) as response:
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


def test_a_c_move_answered_with_pending_responses_without_end_is_aborted(
        server: PasserelleProcess, pacs: HostilePacs) -> None:
    asked = _study(3)
    pacs.listed, pacs.sent = asked, None
    summary = _fetch(server, asked[0].StudyInstanceUID, MOVING_AE)
    [outcome] = summary["studies"]
    assert "pending C-MOVE responses for" in outcome["error"], outcome
    assert not summary["complete"]
    wait_for(lambda: not pacs.moving, 30, "the C-MOVE's association ended")
    assert pacs.move_pending < 100_000  # ended by the abort, not by the peer


def test_on_demand_retrievals_at_once_are_bounded(tmp_path: Path, pacs: HostilePacs) -> None:
    server = PasserelleProcess(tmp_path / "data", pacs=f"{PACS_AE}@127.0.0.1:{pacs.port}/get",
                               pacs_timeout="20", http_workers="1",
                               retrieve_wait_seconds="1").start()
    try:
        studies = [_study(1) for _ in range(MAX_RESTORES + 1)]
        pacs.listed, pacs.sent = [ds for study in studies for ds in study], None
        for [ds] in studies:
            assert _fetch(server, ds.StudyInstanceUID)["complete"]
            for path in (server.data_dir / "studies" / ds.StudyInstanceUID).glob("*/*.dcm"):
                path.unlink()  # the local copy gone, as retention removes it
        pacs.gate.clear()  # the PACS is slow: every retrieval outlasts its client's wait
        answers = [httpx.get(f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}",
                             headers={"Accept": 'multipart/related; type="application/dicom"'},
                             timeout=30) for [ds] in studies]
        assert [a.status_code for a in answers] == [503] * len(studies)
        assert all("not back within 1 s" in a.text for a in answers[:-1])
        assert f"{MAX_RESTORES} other studies are being retrieved" in answers[-1].text
        assert answers[-1].headers["Retry-After"] == "1"
        assert pacs.most_in_flight == MAX_RESTORES
        assert server.metric("passerelle_pacs_restore_waits_total", result="busy") == 1
        pacs.gate.set()
        [last] = studies[-1]
        wait_for(lambda: httpx.get(
            f"{server.base_url}/dicom-web/studies/{last.StudyInstanceUID}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
            timeout=30).status_code == 200, 30, "the last study given back")
    finally:
        pacs.gate.set()
        server.stop()


PUBLISHING = {"stable_seconds": "1", "publish_retry_seconds": "0.2",
              "publish_retry_max_seconds": "1", "registry_timeout": "5",
              "order_issuer_oid": "1.2.250.1.999.1.1.3", "http_workers": "1",
              "retention_high_water_percent": "100", "retention_interval_seconds": "86400"}


def _sent_beside(tmp_path: Path, count: int) -> list[Dataset]:
    """A study to send to a service publishing to the registry of ``tmp_path``, its files
    written beside the registry for its checks of what a manifest references (the
    service's copy may go): tests.conformance.registry."""
    study, series = generate_uid(), generate_uid()
    slices = [national_ct_slice(study, series, 1, i) for i in range(1, count + 1)]
    folder = tmp_path / "0-sent" / "studies" / study / series
    folder.mkdir(parents=True)
    for ds in slices:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return slices


def test_a_purged_study_with_a_rejection_note_is_not_purged_again(
        tmp_path: Path, pacs: HostilePacs) -> None:
    """The note's own file stays (it is no instance a PACS must hold): the study is still
    gone, not removed again at every pass, audited and counted each time."""
    with RegistryProcess(tmp_path / "registry") as registry, PasserelleProcess(
            tmp_path / "data", pacs=f"{PACS_AE}@127.0.0.1:{pacs.port}/get",
            registry_url=registry.fhir_url, **PUBLISHING) as server:
        slices = _sent_beside(tmp_path, 3)
        study = slices[0].StudyInstanceUID
        for ds in [*slices, rejection_note(slices[0], "113037", [slices[0]])]:
            assert send(server.dicom_port, ds)[0] == 0x0000
        pacs.listed, pacs.sent = slices[1:], None
        purge = f"{server.base_url}/admin/studies/{study}/purge"

        def purged() -> bool:
            answer = httpx.post(purge, timeout=30)
            assert answer.status_code in (200, 409), answer.text
            return answer.status_code == 200

        wait_for(purged, 60, "the study purged once published")
        removed = server.metric("passerelle_local_copies_removed_total", trigger="purge")

        again = httpx.post(purge, timeout=30).json()["decision"]

        assert again["action"] == "gone", again
        assert server.metric("passerelle_local_copies_removed_total",
                             trigger="purge") == removed
        decisions = {d["study_uid"]: d for d in httpx.post(
            f"{server.base_url}/admin/retention", timeout=30).json()["decisions"]}
        assert study not in decisions  # no local copy left to decide about


def test_a_study_uid_from_the_pacs_is_checked_before_use(server: PasserelleProcess,
                                                         pacs: HostilePacs) -> None:
    """A C-FIND response naming a Study Instance UID that is no UID (a path, here) is
    left out: the study's lock file is named after it."""
    [ds] = _study(1)
    ds.AccessionNumber = "ACC-ESCAPE"
    ds.StudyInstanceUID = "../../escaped/x"
    pacs.listed, pacs.sent = [ds], [ds]
    answer = httpx.post(f"{server.base_url}/admin/fetch", json={"accession": "ACC-ESCAPE"},
                        timeout=60)
    assert answer.status_code == 404, answer.text
    assert not (server.data_dir.parent / "escaped").exists()
    assert "invalid Study Instance UID" in server.log()


def test_a_study_the_pacs_cannot_give_back_whole_is_not_retrieved_at_every_request(
        server: PasserelleProcess, pacs: HostilePacs) -> None:
    asked = _study(2)
    pacs.listed, pacs.sent = asked, None
    assert _fetch(server, asked[0].StudyInstanceUID)["complete"]
    for path in (server.data_dir / "studies" / asked[0].StudyInstanceUID).glob("*/*.dcm"):
        path.unlink()  # the local copy gone, as retention removes it
    pacs.sent = asked[:1]  # the PACS lost one instance since
    url = f"{server.base_url}/dicom-web/studies/{asked[0].StudyInstanceUID}"
    accept = {"Accept": 'multipart/related; type="application/dicom"'}
    gets = pacs.gets

    answers = [httpx.get(url, headers=accept, timeout=60) for _ in range(6)]

    assert [a.status_code for a in answers] == [503] * 6
    assert "1 still missing" in answers[0].text, answers[0].text
    assert all("could not be retrieved from the PACS" in a.text for a in answers)
    assert all(a.headers["Retry-After"] == "30" for a in answers)
    # One retrieval in each HTTP worker (2), not one a request, until the Retry-After.
    assert pacs.gets - gets <= 2


def test_passerelle_fetch_prints_what_a_pacs_answered_escaped(server: PasserelleProcess,
                                                              pacs: HostilePacs) -> None:
    [ds] = _study(1, patient_id="PAT\x1b[2J\x1b[1A")  # clear the screen, cursor up
    ds.AccessionNumber = "ACC-TERMINAL"
    pacs.listed, pacs.sent = [ds], [ds]
    done = server.cli("fetch", "--accession", "ACC-TERMINAL", "--peer", PACS_AE)
    assert "\x1b" not in done.stdout + done.stderr
    assert "PAT\\x1b[2J\\x1b[1A" in done.stdout, done.stdout


def test_an_error_comment_from_the_pacs_is_escaped(tmp_path: Path, pacs: HostilePacs) -> None:
    with RegistryProcess(tmp_path / "registry") as registry, PasserelleProcess(
            tmp_path / "data", pacs=f"{PACS_AE}@127.0.0.1:{pacs.port}/get",
            registry_url=registry.fhir_url, **PUBLISHING) as server:
        slices = _sent_beside(tmp_path, 1)
        assert send(server.dicom_port, slices[0])[0] == 0x0000
        pacs.find_failure = "no\x1b[2J\nPURGED"
        try:
            purge = f"{server.base_url}/admin/studies/{slices[0].StudyInstanceUID}/purge"
            wait_for(lambda: "answered C-FIND" in httpx.post(purge, timeout=30).text, 60,
                     "the purge refused for what the PACS answered")
            done = server.cli("purge", "--study", slices[0].StudyInstanceUID)
        finally:
            pacs.find_failure = ""
        assert done.returncode == 1
        assert "answered C-FIND with 0xC000 no\\x1b[2J\\nPURGED" in done.stderr, done.stderr
        assert "\x1b" not in done.stderr


def test_patient_counts_are_of_that_patient_only(server: PasserelleProcess) -> None:
    """NumberOfPatientRelated* of a patient whose ID is empty, or holds a wild card
    character, count that patient's studies, not every study that would match it."""
    for patient_id in ("", "", "WILD*", "WILDCARD"):
        [ds] = _study(1, patient_id=patient_id)
        assert send(server.dicom_port, ds)[0] == 0x0000
    ae = AE("REVIEWSCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = ""
        query.NumberOfPatientRelatedStudies = ""
        counts = {str(found.PatientID or ""): int(found.NumberOfPatientRelatedStudies)
                  for status, found in assoc.send_c_find(
                      query, PatientRootQueryRetrieveInformationModelFind)
                  if status and status.Status in (0xFF00, 0xFF01)}
    finally:
        assoc.release()
    assert (counts[""], counts["WILD*"], counts["WILDCARD"]) == (2, 1, 1), counts
