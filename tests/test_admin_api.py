"""The read API under /admin that the console and scripts share (gateway.web.admin): pages
of studies matched as QIDO-RS matches them, a study with its series and its publications
(failed first), pages of the outbox; on both index dialects, and over the control socket of
a running service."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from storage.outbox import Outbox
from tests.inprocess import InProcessService
from tests.processes import PasserelleProcess
from tests.scu import send
from tests.synthetic import ct_slice

# (patient id, patient name, study date, modality, instances)
STUDIES = [("PAT1", "DOE^JOHN", "20240105", "CT", 1), ("PAT1", "DOE^JOHN", "20240610", "MR", 2),
           ("PAT2", "ROE^JANE", "20231120", "CT", 1), ("PAT3", "MARTIN^LUC", "20250301", "US", 1),
           ("PAT2", "ROE^JANE", "20240301", "CT", 3)]


@pytest.fixture
def service(tmp_path: Path, database_url: str) -> Iterator[tuple[InProcessService, list[str]]]:
    """A service holding STUDIES (their UIDs in that order)."""
    with InProcessService(tmp_path / "data", database_url=database_url) as service:
        uids = []
        for patient, name, date, modality, count in STUDIES:
            study, series = generate_uid(), generate_uid()
            service.ingest_all(ct_slice(study, series, 1, n, size=8, patient_id=patient,
                                        PatientName=name, StudyDate=date, Modality=modality)
                               for n in range(1, count + 1))
            uids.append(study)
        yield service, uids


def _listed(service: InProcessService, query: str) -> dict:
    response = service.get(f"/admin/studies?{query}")
    assert response.status_code == 200, response.text
    return response.json()


def test_the_study_list_is_a_page_of_the_matching_studies_most_recent_first(
        service: tuple[InProcessService, list[str]]) -> None:
    server, uids = service
    by_date = [uids[n] for n in (3, 1, 4, 0, 2)]  # study dates, newest first
    pages = [_listed(server, f"limit=2&offset={offset}") for offset in (0, 2, 4)]
    assert [page["total"] for page in pages] == [5, 5, 5]
    assert [s["study_uid"] for page in pages for s in page["studies"]] == by_date
    assert (pages[0]["limit"], pages[2]["offset"]) == (2, 4)
    assert _listed(server, "")["limit"] == 50

    def matched(query: str) -> list[str]:
        page = _listed(server, query)
        assert page["total"] == len(page["studies"])
        return [s["study_uid"] for s in page["studies"]]

    assert matched("PatientID=PAT2") == [uids[4], uids[2]]
    assert matched("PatientName=DOE*") == [uids[1], uids[0]]
    assert matched("StudyDate=20240101-20240630") == [uids[1], uids[4], uids[0]]
    assert matched("ModalitiesInStudy=MR") == [uids[1]]
    assert matched(f"StudyInstanceUID={uids[3]}") == [uids[3]]
    assert matched("PatientID=NOBODY") == []


def test_each_listed_study_has_its_counts_times_size_and_newest_publication(
        service: tuple[InProcessService, list[str]]) -> None:
    server, uids = service
    started = time.time()
    [listed] = _listed(server, f"StudyInstanceUID={uids[4]}")["studies"]
    files = [server.store.blobs.absolute(path)
             for path in server.store.index.study_paths(uids[4])]
    assert (listed["series_count"], listed["instance_count"]) == (1, 3)
    assert listed["size"] == sum(file.stat().st_size for file in files) > 0
    assert listed["first_received_at"] <= listed["last_received_at"] <= started
    assert (listed["patient_id"], listed["modalities"]) == ("PAT2", ["CT"])
    assert listed["publication"] is None
    queued = server.post(f"/admin/studies/{uids[4]}/publish").json()["publication"]
    [listed] = _listed(server, f"StudyInstanceUID={uids[4]}")["studies"]
    assert (listed["publication"]["id"], listed["publication"]["state"]) == (queued["id"],
                                                                             "pending")


def test_a_study_shows_its_series_and_its_publications_failed_first(
        service: tuple[InProcessService, list[str]]) -> None:
    server, uids = service
    study, series = uids[0], generate_uid()
    server.ingest_all(ct_slice(study, series, 2, n, size=8, patient_id="PAT1",
                               PatientName="DOE^JOHN", StudyDate="20240105")
                      for n in range(1, 3))
    first = server.post(f"/admin/studies/{study}/publish").json()["publication"]
    outbox = Outbox(server.store.index)
    claimed = outbox.claim("test", 60)
    assert claimed is not None and claimed.id == first["id"]
    outbox.fail(claimed, "registry refused: bad patient", '{"resourceType": "OperationOutcome"}')
    second = server.post(f"/admin/studies/{study}/unpublish").json()["publication"]
    shown = server.get(f"/admin/studies/{study}").json()
    assert shown["study"]["study_uid"] == study and shown["study"]["series_count"] == 2
    assert [(s["series_number"], s["instance_count"]) for s in shown["series"]] == [(1, 1),
                                                                                    (2, 2)]
    assert all(s["size"] > 0 and s["first_received_at"] <= s["last_received_at"]
               for s in shown["series"])
    assert [(p["id"], p["state"]) for p in shown["publications"]] == [
        (first["id"], "failed"), (second["id"], "pending")]
    assert shown["publications"][0]["last_error"] == "registry refused: bad patient"
    assert shown["publication_total"] == 2
    paged = server.get(f"/admin/studies/{study}?limit=1&offset=1").json()
    assert [p["id"] for p in paged["publications"]] == [second["id"]]
    assert server.get(f"/admin/studies/{generate_uid()}").status_code == 404

    def listed(query: str) -> list[tuple[int, str]]:
        page = server.get(f"/admin/outbox?{query}").json()
        return [(p["id"], p["state"]) for p in page["publications"]]

    assert listed("") == [(first["id"], "failed"), (second["id"], "pending")]
    assert listed("state=failed") == [(first["id"], "failed")]
    assert listed("state=pending&limit=5") == [(second["id"], "pending")]
    assert server.get("/admin/outbox?limit=1").json()["total"] == 2


@pytest.mark.parametrize("query", [
    "limit=0", "limit=1001", "offset=-1", "limit=ten", "NoSuchAttribute=1",
    "PatientID=A&PatientID=B", "StudyDate=2024-01-01", "fuzzymatching=maybe"])
def test_a_bad_study_list_query_is_400_with_its_reason(tmp_path: Path, query: str) -> None:
    with InProcessService(tmp_path / "data") as server:
        response = server.get(f"/admin/studies?{query}")
        assert response.status_code == 400, response.text
        assert response.json()["error"]


def test_a_bad_outbox_query_is_400_with_its_reason(tmp_path: Path) -> None:
    with InProcessService(tmp_path / "data") as server:
        refused = server.get("/admin/outbox?state=lost")
        assert refused.status_code == 400
        assert "unknown state" in refused.json()["error"]
        assert server.get("/admin/outbox?offset=x").status_code == 400


def test_the_running_service_pages_the_same_over_its_control_socket(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", http_workers="1", dicom_receivers="1") as server:
        studies = [generate_uid() for _ in range(3)]
        for number, study in enumerate(studies, 1):
            ds = ct_slice(study, generate_uid(), 1, 1, size=8, StudyDate=f"2024010{number}")
            assert send(server.dicom_port, ds)[0] == 0
        over_tcp = httpx.get(f"{server.base_url}/admin/studies?limit=2").json()
        local = httpx.Client(transport=httpx.HTTPTransport(
            uds=str(tmp_path / "data" / "control.sock")), base_url="http://passerelle")
        with local:
            over_socket = local.get("/admin/studies?limit=2").json()
            assert local.get("/admin/studies?limit=2&limit=3").status_code == 400
        assert over_socket == over_tcp
        assert over_tcp["total"] == 3
        assert [s["study_uid"] for s in over_tcp["studies"]] == studies[:0:-1]
