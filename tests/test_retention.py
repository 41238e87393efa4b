"""Retention of local copies against real PACS peers: Orthanc (loaded through its REST API)
and dcmtk's stricter dcmqrscp (loaded with storescu), beside running services publishing to
the local registry. A copy goes only when one peer holds every instance of the study; the
index keeps the study, published and served."""

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from gateway.dicom.peer import DicomPeer
from storage.index import Index
from storage.outbox import Outbox, State
from tests.dcmqrscp import DcmqrscpProcess
from tests.orthanc import OrthancProcess
from tests.processes import PasserelleProcess, RegistryProcess, wait_for
from tests.scu import send
from tests.synthetic import national_ct_slice

FAST = {"stable_seconds": "1", "publish_retry_seconds": "0.2", "publish_retry_max_seconds": "1",
        "registry_timeout": "5", "order_issuer_oid": "1.2.250.1.999.1.1.3", "http_workers": "1",
        # The machine's own disk must not decide for the tests that do not ask it to.
        "retention_high_water_percent": "100"}
DAY = 86400.0
SENT = "0-sent"


class Study:
    """A small CT study written to files, sent to a service and loaded into PACS peers.

    The files are written beside the registry, in the layout of the data dir
    (``SENT/studies/<study>/<series>/<sop>.dcm``): its checks read there the instances a
    manifest references, since the services' own copies may be gone (the name sorts before
    theirs: tests.conformance.registry reads the first it finds)."""

    def __init__(self, beside_registry: Path, series: int = 2, per_series: int = 2) -> None:
        self.uid = generate_uid()
        self.files: list[Path] = []
        self.sop_uids: list[str] = []
        for s in range(1, series + 1):
            series_uid = generate_uid()
            folder = beside_registry / SENT / "studies" / self.uid / series_uid
            folder.mkdir(parents=True)
            for i in range(1, per_series + 1):
                ds = national_ct_slice(self.uid, series_uid, s, i)
                path = folder / f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(path, enforce_file_format=True)
                self.files.append(path)
                self.sop_uids.append(ds.SOPInstanceUID)

    def send_to(self, service: PasserelleProcess) -> "Study":
        for path in self.files:
            assert send(service.dicom_port, path)[0] == 0x0000
        return self

    def upload_to(self, orthanc: OrthancProcess) -> "Study":
        for path in self.files:
            orthanc.upload(path)
        return self


def _index(service: PasserelleProcess) -> Index:
    return Index(service.data_dir / "index.sqlite")


def _published(service: PasserelleProcess, study: Study) -> None:
    """Wait until the registry acknowledged the study's manifest (a copy goes only then)."""
    index = _index(service)
    try:
        outbox = Outbox(index)

        def acknowledged() -> bool:
            row = outbox.latest_of([study.uid]).get(study.uid)
            return row is not None and row.state is State.ACKNOWLEDGED

        wait_for(acknowledged, 60, f"publication of {study.uid}")
    finally:
        index.close()


def _files(service: PasserelleProcess, study: Study) -> list[Path]:
    return sorted((service.data_dir / "studies" / study.uid).glob("*/*.dcm"))


def _copy_state(service: PasserelleProcess, study: Study) -> tuple[float | None, str, int]:
    """copy_removed_at, copy_held_by and the instance rows of a study in the index."""
    with sqlite3.connect(service.data_dir / "index.sqlite") as db:
        removed_at, held_by = db.execute(
            "SELECT copy_removed_at, copy_held_by FROM studies WHERE study_uid = ?",
            (study.uid,)).fetchone()
        rows = db.execute("""SELECT count(*) FROM instances i JOIN series se
                             ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk
                             WHERE st.study_uid = ?""", (study.uid,)).fetchone()[0]
    return removed_at, held_by, rows


def _age(service: PasserelleProcess, study: Study, days: float) -> None:
    """Make the study's last reception ``days`` old (its accesses are left as they are)."""
    with sqlite3.connect(service.data_dir / "index.sqlite", timeout=30) as db:
        db.execute("UPDATE studies SET first_received_at = ?, last_received_at = ?"
                   " WHERE study_uid = ?", (time.time() - days * DAY,) * 2 + (study.uid,))


def _read(service: PasserelleProcess, study: Study) -> None:
    """Read the study through DICOMweb, and wait until the access is counted."""
    response = httpx.get(f"{service.base_url}/dicom-web/studies/{study.uid}/metadata",
                         timeout=30)
    assert response.status_code == 200

    def counted() -> bool:
        with sqlite3.connect(service.data_dir / "index.sqlite") as db:
            return db.execute("""SELECT count(*) FROM study_accesses a JOIN studies st
                                 ON a.study_pk = st.pk WHERE st.study_uid = ?""",
                              (study.uid,)).fetchone()[0] > 0

    wait_for(counted, 30, f"the access to {study.uid} counted")


def _decisions(service: PasserelleProcess, *args: str) -> dict[str, dict]:
    result = service.cli("retention", "--json", *args)
    assert result.returncode == 0, result.stderr
    return {decision["study_uid"]: decision for decision in json.loads(result.stdout)}


# Orthanc answers C-FIND only from the AEs it knows (by AE title: the port is for C-MOVE).
KNOWN = {"passerelle": DicomPeer("PASSERELLE", "127.0.0.1", 104)}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the registry, of the services publishing to it and of what they were
    sent (the registry's checks read the instances beside it)."""
    return tmp_path_factory.mktemp("retention")


@pytest.fixture(scope="module")
def registry(base: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(base / "registry") as process:
        yield process


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    pacs = OrthancProcess(tmp_path_factory.mktemp("orthanc"), KNOWN, dicomweb=False).start()
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DcmqrscpProcess]:
    pacs = DcmqrscpProcess(tmp_path_factory.mktemp("dcmqrscp")).start()
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def service(base: Path, registry: RegistryProcess, orthanc: OrthancProcess,
            dcmqrscp: DcmqrscpProcess) -> Iterator[PasserelleProcess]:
    """Orthanc then dcmqrscp as its PACS; retention after 30 days, no pass of its own
    during the tests (the commands run them)."""
    with PasserelleProcess(base / "data",
                           pacs=f"{orthanc.peer()},{dcmqrscp.peer()}",
                           registry_url=registry.fhir_url, retention_days="30",
                           retention_interval_seconds="86400", **FAST) as process:
        yield process


def test_purge_removes_the_copy_a_pacs_holds_and_keeps_the_study(
        service: PasserelleProcess, orthanc: OrthancProcess, base: Path) -> None:
    study = Study(base).send_to(service).upload_to(orthanc)
    _published(service, study)
    size = sum(path.stat().st_size for path in _files(service, study))
    removed_before = service.metric("passerelle_local_copies_removed_total", trigger="purge")
    freed_before = service.metric("passerelle_local_copy_bytes_freed_total")

    result = service.cli("purge", "--study", study.uid)

    assert result.returncode == 0, result.stderr
    assert f"local copy of study {study.uid} removed: 4 instances" in result.stdout
    assert "held by ORTHANC" in result.stdout
    assert _files(service, study) == []
    removed_at, held_by, rows = _copy_state(service, study)
    assert removed_at is not None and held_by == "ORTHANC" and rows == 4
    assert service.metric("passerelle_local_copies_removed_total",
                          trigger="purge") == removed_before + 1
    assert service.metric("passerelle_local_copy_bytes_freed_total") == freed_before + size
    assert (f"local copy of study {study.uid} removed: 4 instances, {size} bytes, held by"
            " ORTHANC") in service.log()
    # Still published and found.
    found = httpx.get(f"{service.base_url}/dicom-web/studies",
                      params={"StudyInstanceUID": study.uid}, timeout=30).json()
    assert [item["0020000D"]["Value"] for item in found] == [[study.uid]]
    def removals() -> list[dict]:
        audit = json.loads(service.cli("audit", "--study", study.uid, "--json").stdout)
        return [event for event in audit
                if event["EventIdentification"]["EventActionCode"] == "D"]

    wait_for(removals, 30, "the removal audited")
    assert len(removals()) == 1
    assert removals()[0]["EventIdentification"]["EventOutcomeDescription"].startswith(
        "local copy removed, held by ORTHANC")
    # Nothing left to remove: said, not an error.
    again = service.cli("purge", "--study", study.uid)
    assert again.returncode == 0 and "removed before, held by ORTHANC" in again.stdout


def test_purge_is_refused_when_the_pacs_lacks_an_instance(
        service: PasserelleProcess, orthanc: OrthancProcess, base: Path) -> None:
    study = Study(base).send_to(service).upload_to(orthanc)
    orthanc.delete_instance(study.sop_uids[2])
    _published(service, study)
    refused_before = service.metric("passerelle_retention_refusals_total", reason="not_held")

    result = service.cli("purge", "--study", study.uid)

    assert result.returncode == 1
    assert (f"ORTHANC holds 3 of 4 instances; missing {study.sop_uids[2]}"
            in result.stderr), result.stderr
    assert "DCMQRSCP holds 0 of 4 instances" in result.stderr
    assert len(_files(service, study)) == 4
    assert _copy_state(service, study) == (None, "", 4)
    assert service.metric("passerelle_retention_refusals_total",
                          reason="not_held") == refused_before + 1


def test_the_stricter_peer_confirms_what_orthanc_lacks(
        service: PasserelleProcess, orthanc: OrthancProcess, dcmqrscp: DcmqrscpProcess,
        base: Path) -> None:
    study = Study(base).send_to(service).upload_to(orthanc)
    orthanc.delete_instance(study.sop_uids[0])
    dcmqrscp.load(study.files)
    _published(service, study)

    result = service.cli("purge", "--study", study.uid)

    assert result.returncode == 0, result.stderr
    assert "held by DCMQRSCP" in result.stdout
    assert _files(service, study) == []
    assert _copy_state(service, study)[1:] == ("DCMQRSCP", 4)


def test_a_study_whose_manifest_is_not_acknowledged_is_kept(
        tmp_path: Path, orthanc: OrthancProcess) -> None:
    # No registry_url: its manifest stays queued in the outbox.
    with PasserelleProcess(tmp_path / "data", pacs=str(orthanc.peer()), **FAST) as service:
        study = Study(tmp_path).send_to(service).upload_to(orthanc)
        index = _index(service)
        try:
            wait_for(lambda: study.uid in Outbox(index).latest_of([study.uid]), 30,
                     "the study queued")
        finally:
            index.close()

        result = service.cli("purge", "--study", study.uid)

        assert result.returncode == 1
        assert "a publication of it is pending in the outbox" in result.stderr, result.stderr
        assert len(_files(service, study)) == 4


def test_the_policy_removes_what_nobody_read_for_retention_days(
        service: PasserelleProcess, orthanc: OrthancProcess, base: Path) -> None:
    unread = Study(base).send_to(service).upload_to(orthanc)
    read = Study(base).send_to(service).upload_to(orthanc)
    lacking = Study(base).send_to(service)  # not in any PACS
    for study in (unread, read, lacking):
        _published(service, study)
    _read(service, read)
    for study in (unread, read, lacking):
        _age(service, study, 40)

    dry = _decisions(service, "--dry-run")

    assert dry[unread.uid]["action"] == "remove"
    assert dry[unread.uid]["reason"] == ("not read for 40.0 days (retention_days 30); held"
                                         " by ORTHANC")
    assert dry[read.uid]["action"] == "keep"
    assert dry[read.uid]["reason"].startswith("read 0.0 days ago (retention_days 30)")
    assert dry[lacking.uid]["action"] == "keep"
    assert "ORTHANC holds 0 of 4 instances" in dry[lacking.uid]["reason"]
    assert "DCMQRSCP holds 0 of 4 instances" in dry[lacking.uid]["reason"]
    for study in (unread, read, lacking):  # a dry run removes nothing
        assert len(_files(service, study)) == 4
        assert _copy_state(service, study)[0] is None
    listing = service.cli("retention", "--dry-run")
    assert listing.returncode == 0
    assert "dry run: 1 of" in listing.stdout and "would go" in listing.stdout

    done = _decisions(service)

    assert done[unread.uid]["action"] == "removed"
    assert _files(service, unread) == []
    assert _copy_state(service, unread)[1] == "ORTHANC"
    assert {done[read.uid]["action"], done[lacking.uid]["action"]} == {"keep"}
    assert len(_files(service, read)) == len(_files(service, lacking)) == 4


def test_without_a_pacs_peer_nothing_is_removed(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", retention_days="0.00001",
                           retention_high_water_percent="1", stable_seconds="1") as service:
        study = Study(tmp_path).send_to(service)
        _age(service, study, 40)

        listing = _decisions(service)
        purge = service.cli("purge", "--study", study.uid)

        assert listing[study.uid]["action"] == "keep"
        assert listing[study.uid]["reason"].startswith("no PACS peer configured")
        assert purge.returncode == 1 and "no PACS peer configured" in purge.stderr
        assert len(_files(service, study)) == 4
        assert _copy_state(service, study)[0] is None


def test_a_pacs_down_removes_nothing_and_says_why(tmp_path: Path, base: Path,
                                                  registry: RegistryProcess) -> None:
    orthanc = OrthancProcess(tmp_path / "orthanc", KNOWN, dicomweb=False).start()
    try:
        with PasserelleProcess(base / "down", pacs=str(orthanc.peer()),
                               registry_url=registry.fhir_url, retention_days="30",
                               **FAST) as service:
            study = Study(base).send_to(service).upload_to(orthanc)
            _published(service, study)
            _age(service, study, 40)
            orthanc.stop()
            before = service.metric("passerelle_retention_refusals_total",
                                    reason="pacs_unreachable")

            decisions = _decisions(service)
            purge = service.cli("purge", "--study", study.uid)

            where = f"ORTHANC at 127.0.0.1:{orthanc.dicom_port}"
            assert decisions[study.uid]["action"] == "keep"
            assert decisions[study.uid]["reason"].startswith(where)
            assert purge.returncode == 1 and where in purge.stderr
            assert len(_files(service, study)) == 4
            assert _copy_state(service, study)[0] is None
            assert service.metric("passerelle_retention_refusals_total",
                                  reason="pacs_unreachable") == before + 2
    finally:
        orthanc.stop()


def test_above_the_high_water_mark_the_background_pass_removes_what_is_held(
        base: Path, registry: RegistryProcess, orthanc: OrthancProcess) -> None:
    settings = {**FAST, "retention_high_water_percent": "0.001"}
    with PasserelleProcess(base / "full", pacs=str(orthanc.peer()),
                           registry_url=registry.fhir_url, retention_interval_seconds="1",
                           **settings) as service:
        held = Study(base).send_to(service).upload_to(orthanc)
        lacking = Study(base).send_to(service)

        wait_for(lambda: not _files(service, held), 60, "the background pass")

        assert _copy_state(service, held)[1:] == ("ORTHANC", 4)
        assert service.metric("passerelle_local_copies_removed_total", trigger="disk") == 1
        assert len(_files(service, lacking)) == 4
        assert f"study {held.uid} removed: 4 instances" in service.log()
        assert "above the high-water mark 0.001%" in service.log()
