"""``passerelle fetch`` and ``POST /admin/fetch`` against Orthanc as the PACS: C-FIND, then
C-MOVE (to our AE title, which Orthanc knows) or C-GET; what is fetched is published to the
registry as a pushed study is."""

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from gateway.dicom.peer import DicomPeer, Retrieve
from gateway.pacs.fetch_cli import FetchView
from tests.inprocess import InProcessService
from tests.orthanc import OrthancProcess
from tests.processes import REPO, PasserelleProcess, RegistryProcess, free_port, wait_for
from tests.synthetic import national_ct_slice, part10

FAST = {"stable_seconds": "1", "publish_retry_seconds": "0.2", "publish_retry_max_seconds": "1",
        "registry_timeout": "2", "order_issuer_oid": "1.2.250.1.999.1.1.3"}


def _load(orthanc: OrthancProcess, accession: str, series: int = 2, per_series: int = 3) -> str:
    """A new study of ``series`` x ``per_series`` slices stored in Orthanc; its UID."""
    study = generate_uid()
    for s in range(1, series + 1):
        series_uid = generate_uid()
        for i in range(1, per_series + 1):
            ds = national_ct_slice(study, series_uid, s, i)
            ds.AccessionNumber = accession
            orthanc.upload(part10(ds))
    return study


class _Setup:
    def __init__(self, tmp: Path) -> None:
        dicom_port = free_port()
        self.orthanc = OrthancProcess(tmp / "orthanc", {
            "PASSERELLE": DicomPeer("PASSERELLE", "127.0.0.1", dicom_port)}).start()
        move = self.orthanc.peer(Retrieve.MOVE)
        get = DicomPeer("ORTHANCGET", "127.0.0.1", self.orthanc.dicom_port, Retrieve.GET)
        self.peers = f"{move},{get}"
        self.registry = RegistryProcess(tmp / "registry").start()
        self.server = PasserelleProcess(tmp / "data", dicom_port=str(dicom_port),
                                        pacs=self.peers, registry_url=self.registry.fhir_url,
                                        **FAST).start()

    def stop(self) -> None:
        self.server.stop()
        self.registry.stop()
        self.orthanc.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Setup]:
    running = _Setup(tmp_path_factory.mktemp("fetch"))
    try:
        yield running
    finally:
        running.stop()


def _local_sop_uids(server: PasserelleProcess, study: str) -> set[str]:
    found = httpx.get(f"{server.base_url}/dicom-web/studies/{study}/instances")
    if found.status_code == 204:
        return set()
    return {item["00080018"]["Value"][0] for item in found.raise_for_status().json()}


def _published(setup: _Setup, study: str) -> None:
    wait_for(lambda: setup.registry.documents(study), 30, f"the manifest of {study}")


def test_fetch_by_study_with_c_move_is_published(setup: _Setup) -> None:
    study = _load(setup.orthanc, "ACC-MOVE-1")
    done = setup.server.cli("fetch", "--study", study, "--peer", "ORTHANC")
    assert done.returncode == 0, done.stderr
    assert f"study {study} from ORTHANC: 6 retrieved, 0 failed, 6 stored" in done.stderr
    assert "1 study found, 6 instance(s) retrieved, 0 failed" in done.stdout
    assert _local_sop_uids(setup.server, study) == setup.orthanc.sop_uids(study)
    _published(setup, study)
    assert setup.server.metric("passerelle_pacs_fetches_total", result="complete") >= 1


def test_fetch_by_accession_with_c_get_through_the_admin_api(setup: _Setup) -> None:
    study = _load(setup.orthanc, "ACC-GET-1", series=1, per_series=4)
    with httpx.stream("POST", f"{setup.server.base_url}/admin/fetch", timeout=60,
                      json={"accession": "ACC-GET-1", "peer": "ORTHANCGET"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in response.iter_lines() if line]
    assert events[0]["event"] == "found"
    assert any(e["event"] == "progress" for e in events)
    summary = events[-1]
    assert summary["event"] == "summary" and summary["complete"]
    assert summary["found"] == 1 and summary["retrieved"] == 4
    [outcome] = summary["studies"]
    assert (outcome["study_uid"], outcome["peer"], outcome["stored"]) == (study, "ORTHANCGET", 4)
    assert _local_sop_uids(setup.server, study) == setup.orthanc.sop_uids(study)
    _published(setup, study)


def test_fetch_by_patient_since_finds_every_peer_once(setup: _Setup) -> None:
    done = setup.server.cli("fetch", "--patient", "PAT001", "--since", "2000-01-01")
    assert done.returncode == 0, done.stderr
    # each study held by Orthanc, answered by both peer entries, fetched once
    uids = {line.split()[1] for line in done.stderr.splitlines() if line.startswith("study ")}
    held = httpx.get(f"{setup.orthanc.base_url}/studies").json()
    assert len(uids) == len(held)


@pytest.mark.parametrize("body, message", [
    ({"accession": "ACC*"}, "no * ? or \\"),
    ({"study": "1.2.3", "accession": "A"}, "exactly one of"),
    ({"accession": "A", "since": "2020-01-01"}, "since applies to a patient"),
    ({"patient": "P", "since": "yesterday"}, "YYYY-MM-DD"),
    ({"study": "1.2.x"}, "invalid study UID"),
    ({"study": "1.2.3", "peer": "NOPE"}, "no PACS peer 'NOPE'"),
    ({"study": "1.2.3", "extra": 1}, "unknown field"),
])
def test_bad_fetch_requests_are_refused(setup: _Setup, body: dict, message: str) -> None:
    answer = httpx.post(f"{setup.server.base_url}/admin/fetch", json=body)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_nothing_matched_is_a_404(setup: _Setup) -> None:
    answer = httpx.post(f"{setup.server.base_url}/admin/fetch",
                        json={"accession": "NO-SUCH-ACC"})
    assert answer.status_code == 404 and "no study matches" in answer.json()["error"]
    done = setup.server.cli("fetch", "--accession", "NO-SUCH-ACC")
    assert done.returncode == 1 and "no study matches" in done.stderr


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_without_a_pacs_fetch_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSERELLE_")}
    done = _cli({**env, "PASSERELLE_DATA_DIR": str(tmp_path / "data")}, "fetch", "--study",
                "1.2.3")
    assert done.returncode == 2 and "no PACS peer is configured" in done.stderr
    with InProcessService(tmp_path / "web") as web:
        answer = web.post("/admin/fetch", json={"study": "1.2.3"})
        assert answer.status_code == 400 and "no PACS peer" in answer.json()["error"]


def test_without_a_service_fetch_by_c_get_runs_here(setup: _Setup, tmp_path: Path) -> None:
    study = _load(setup.orthanc, "ACC-HERE-1", series=1, per_series=2)
    env = {**os.environ, "PASSERELLE_DATA_DIR": str(tmp_path / "alone"),
           "PASSERELLE_PACS": setup.peers}
    (tmp_path / "alone").mkdir()
    refused = _cli(env, "fetch", "--study", study)
    assert refused.returncode == 1 and "retrieves by C-MOVE" in refused.stderr
    done = _cli(env, "fetch", "--study", study, "--peer", "ORTHANCGET")
    assert done.returncode == 0, done.stderr
    assert "1 study found, 2 instance(s) retrieved, 0 failed" in done.stdout
    listed = _cli(env, "studies", "--json")
    assert [s["study_uid"] for s in json.loads(listed.stdout)] == [study]


def test_progress_bars_on_a_terminal_lines_otherwise() -> None:
    study = {"event": "study", "study_uid": "1.2.3", "peer": "PACS", "patient_id": "P",
             "accession_number": "A", "study_date": "20250101", "expected": 3,
             "completed": 3, "failed": 0, "warning": 0, "stored": 3, "error": ""}
    events = [{"event": "found", "studies": [{}], "problems": []},
              *({"event": "progress", "study_uid": "1.2.3", "done": n, "total": 3}
                for n in (1, 2, 3)),
              study, {"event": "summary", "found": 1, "retrieved": 3, "failed": 0,
                      "studies": [study], "problems": [], "complete": True}]
    for bars in (True, False):
        out, err = io.StringIO(), io.StringIO()
        view = FetchView(out, err, bars)
        for event in events:
            view.show(event)
        assert view.exit_code() == 0
        assert "1 study found, 3 instance(s) retrieved, 0 failed" in out.getvalue()
        line = "study 1.2.3 from PACS: 3 retrieved, 0 failed, 3 stored"
        assert ("3/3" in err.getvalue() and line not in err.getvalue()) if bars \
            else line in err.getvalue()
