"""Who saw a study (storage.study_accesses): accesses counted per study, user and client
address on both index dialects, by the audit trail's writer off the request path; read as
``GET /admin/studies/{uid}/access`` and the console's "Seen by" section, in the loopback
demo mode and behind tokens against a running service."""

import re
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from pydicom.uid import generate_uid
from sqlalchemy import text

from gateway.config import AuditSettings
from gateway.security import audit
from gateway.security.audit import AuditEvent, AuditTrail, EventType, Outcome, read_events
from storage.study_accesses import Access, SeenBy, StudyAccesses
from tests.inprocess import InProcessService
from tests.issuer import LocalIssuer
from tests.processes import PasserelleProcess, wait_for
from tests.scu import send
from tests.synthetic import ct_slice


def _studies(service: InProcessService, count: int) -> list[str]:
    uids = [generate_uid() for _ in range(count)]
    service.ingest_all(ct_slice(uid, generate_uid(), 1, 1, size=8) for uid in uids)
    return uids


def _page(service: InProcessService, study: str, limit: int = 50, offset: int = 0
          ) -> tuple[list[SeenBy], int]:
    found = StudyAccesses(service.store.index).page(study, limit, offset)
    assert found is not None
    return found


def test_accesses_add_up_per_study_user_and_address(tmp_path: Path, database_url: str) -> None:
    with InProcessService(tmp_path / "data", database_url=database_url) as service:
        seen, other = _studies(service, 2)
        accesses = StudyAccesses(service.store.index)
        accesses.add([Access(seen, "alice", "10.0.0.1", "query", False, 100.0),
                      Access(seen, "alice", "10.0.0.1", "retrieve", False, 105.0),
                      Access(seen, "alice", "10.0.0.2", "access", False, 101.0),
                      Access(seen, "bob", "10.0.0.1", "retrieve", True, 103.0),
                      Access(other, "alice", "10.0.0.1", "query", False, 90.0),
                      Access(generate_uid(), "alice", "10.0.0.1", "query", False, 90.0)])
        # A later batch widens the times; the newest access gives the kind.
        accesses.add([Access(seen, "alice", "10.0.0.1", "access", True, 99.0),
                      Access(seen, "bob", "10.0.0.1", "query", False, 110.0)])
        rows, total = _page(service, seen)
        assert total == 3
        assert rows == [SeenBy("bob", "10.0.0.1", 2, 1, 103.0, 110.0, "query"),
                        SeenBy("alice", "10.0.0.1", 3, 1, 99.0, 105.0, "retrieve"),
                        SeenBy("alice", "10.0.0.2", 1, 0, 101.0, 101.0, "access")]
        assert _page(service, seen, limit=1, offset=1) == (rows[1:2], 3)
        assert _page(service, other) == ([SeenBy("alice", "10.0.0.1", 1, 0, 90.0, 90.0,
                                                 "query")], 1)
        assert accesses.page(generate_uid(), 50, 0) is None  # unknown: nothing counted
        assert service.store.index.fetch("SELECT count(*) FROM study_accesses")[0][0] == 4


def test_a_flood_from_several_writers_only_bumps_the_counters(tmp_path: Path,
                                                              database_url: str) -> None:
    """Writers (the HTTP workers' audit threads, replicas) upsert the same rows at once:
    counts add up, no row beyond one per (study, user, address), no deadlock."""
    with InProcessService(tmp_path / "data", database_url=database_url) as service:
        studies = _studies(service, 3)
        accesses = StudyAccesses(service.store.index)

        def write(writer: int) -> None:
            for batch in range(20):
                accesses.add([Access(study, f"user{n % 2}", "10.0.0.1", "retrieve", False,
                                     float(writer * 100 + batch))
                              for study in reversed(studies) for n in range(10)])

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for study in studies:
            rows, total = _page(service, study)
            assert total == 2
            assert [(row.user, row.count, row.first_at, row.last_at) for row in rows] == [
                ("user0", 400, 0.0, 319.0), ("user1", 400, 0.0, 319.0)]
        assert service.store.index.fetch("SELECT count(*) FROM study_accesses")[0][0] == 6


def test_the_rows_of_a_study_go_with_it(tmp_path: Path, database_url: str) -> None:
    # No path deletes a study yet; its access rows cascade when one does.
    with InProcessService(tmp_path / "data", database_url=database_url) as service:
        gone, kept = _studies(service, 2)
        StudyAccesses(service.store.index).add(
            [Access(uid, "alice", "10.0.0.1", "query", False, 1.0) for uid in (gone, kept)])
        with service.store.index.transaction() as db:
            for sql in ("DELETE FROM instance_metadata", "DELETE FROM instances WHERE series_pk"
                        " IN (SELECT se.pk FROM series se JOIN studies st ON se.study_pk ="
                        " st.pk WHERE st.study_uid = :uid)",
                        "DELETE FROM series WHERE study_pk = (SELECT pk FROM studies WHERE"
                        " study_uid = :uid)", "DELETE FROM patient_modules_to_read",
                        "DELETE FROM studies WHERE study_uid = :uid"):
                db.execute(text(sql), {"uid": gone})
        assert service.store.index.fetch("SELECT count(*) FROM study_accesses")[0][0] == 1
        assert _page(service, kept)[1] == 1


def _event(kind: EventType, action: str, study: str, outcome: Outcome = Outcome.SUCCESS
           ) -> AuditEvent:
    return AuditEvent(kind, action, outcome, "alice", "10.0.0.1", study, detail="GET /x")


def test_the_writer_counts_the_accesses_that_show_a_study(tmp_path: Path) -> None:
    counted: list[Access] = []
    trail = AuditTrail(tmp_path, "PASSERELLE", lambda study: "", AuditSettings(),
                       count_accesses=counted.extend)
    study = generate_uid()
    for event in (_event(EventType.QUERY, "E", study),
                  _event(EventType.INSTANCES_TRANSFERRED, "R", study, Outcome.MINOR_FAILURE),
                  _event(EventType.INSTANCES_ACCESSED, "R", study, Outcome.SERIOUS_FAILURE),
                  _event(EventType.QUERY, "E", ""),  # names no study
                  _event(EventType.INSTANCES_TRANSFERRED, "C", study),  # a store
                  _event(EventType.EXPORT, "R", study),  # a publication
                  _event(EventType.USER_AUTHENTICATION, "E", "", Outcome.MINOR_FAILURE)):
        trail.record(event)
    trail.close()
    assert [(a.kind, a.refused, a.user, a.address) for a in counted] == [
        ("query", False, "alice", "10.0.0.1"), ("retrieve", True, "alice", "10.0.0.1"),
        ("access", True, "alice", "10.0.0.1")]
    assert len(list(read_events(tmp_path))) == 7


def test_a_failed_count_is_logged_and_counted_and_the_trail_keeps_the_access(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(accesses: list[Access]) -> None:
        raise OSError("database is locked")

    metric = "passerelle_study_accesses_unindexed_total"
    before = REGISTRY.get_sample_value(metric) or 0
    trail = AuditTrail(tmp_path, "PASSERELLE", lambda study: "", AuditSettings(),
                       count_accesses=refuse)
    study = generate_uid()
    trail.record(_event(EventType.INSTANCES_TRANSFERRED, "R", study))
    trail.close()
    assert REGISTRY.get_sample_value(metric) == before + 1
    assert "could not count 1 study access(es)" in caplog.text
    [message] = read_events(tmp_path)
    assert message["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == study


def test_the_demo_mode_shows_its_anonymous_reader_and_the_json_pages(tmp_path: Path) -> None:
    with InProcessService(tmp_path / "data") as service:
        [study] = _studies(service, 1)
        for _ in range(3):
            assert service.get(f"/dicom-web/studies/{study}").status_code == 200
        wait_for(lambda: [row.count for row in _page(service, study)[0]] == [3], 10,
                 "the retrieves counted")
        [row] = _page(service, study)[0]
        assert (row.user, row.address, row.count, row.refused, row.last_kind) == (
            "anonymous", "127.0.0.1", 3, 0, "retrieve")
        page = service.get(f"/ui/studies/{study}").text
        assert "Consulté par" in page and "anonyme (sans authentification)" in page
        assert re.search(r'data-user="anonymous" data-address="127.0.0.1" data-count="3"'
                         r' data-refused="0"', page)
        assert f'href="/admin/studies/{study}/access"' in page and "1 sur 1" in page
        english = service.get(f"/ui/studies/{study}", headers={"Accept-Language": "en"}).text
        assert "Seen by" in english and "anonymous (no authentication)" in english
        listed = service.get(f"/admin/studies/{study}/access?limit=1").json()
        assert (listed["total"], listed["offset"], listed["limit"]) == (1, 0, 1)
        assert listed["access"][0]["user"] == "anonymous"
        assert listed["access"][0]["count"] >= 3  # and the console page, once written
        assert service.get(f"/admin/studies/{generate_uid()}/access").status_code == 404
        assert service.get(f"/admin/studies/{study}/access?limit=0").status_code == 400
        other = generate_uid()
        service.ingest(ct_slice(other, generate_uid(), 1, 1, size=8))
        assert "Aucun accès enregistré." in service.get(f"/ui/studies/{other}").text


def _rows(page: str) -> dict[str, tuple[int, int]]:
    """user -> (count, refused) of the "Seen by" table of a study's console page."""
    return {user: (int(count), int(refused)) for user, count, refused in re.findall(
        r'<tr class="access" data-user="([^"]*)" data-address="[^"]*" data-count="(\d+)"'
        r' data-refused="(\d+)">', page)}


def test_a_running_service_lists_each_reader_and_their_refusals(tmp_path: Path) -> None:
    study = generate_uid()
    with LocalIssuer() as issuer, PasserelleProcess(
            tmp_path / "data", **issuer.settings(), http_workers="1",
            dicom_receivers="1") as server:
        assert send(server.dicom_port, ct_slice(study, generate_uid(), 1, 1, size=8))[0] == 0
        base = f"{server.base_url}/dicom-web/studies/{study}"

        def as_user(subject: str, scope: str = "dicomweb.read") -> dict[str, str]:
            return {"Authorization": f"Bearer {issuer.token(scope, sub=subject)}"}

        for _ in range(2):
            assert httpx.get(base, headers=as_user("alice")).status_code == 200
        assert httpx.get(f"{base}/metadata", headers=as_user("bob")).status_code == 200
        assert httpx.get(base, headers=as_user("mallory", "openid")).status_code == 403
        operator = as_user("operator", "dicomweb.read passerelle.admin")  # the console: read

        def listed() -> dict[str, dict]:
            page = httpx.get(f"{server.base_url}/admin/studies/{study}/access",
                             headers=operator).json()
            return {row["user"]: row for row in page["access"]}

        wait_for(lambda: {"alice", "bob", "mallory"} <= set(listed()), 20, "the accesses")
        rows = listed()
        assert {user: (row["count"], row["refused"], row["last_kind"], row["address"])
                for user, row in rows.items() if user != "operator"} == {
            "alice": (2, 0, "retrieve", "127.0.0.1"), "bob": (1, 0, "access", "127.0.0.1"),
            "mallory": (1, 1, "retrieve", "127.0.0.1")}
        assert rows["alice"]["first_at"] <= rows["alice"]["last_at"]
        page = httpx.get(f"{server.base_url}/ui/studies/{study}", headers=operator).text
        shown = _rows(page)
        assert {user: shown[user] for user in ("alice", "bob", "mallory")} == {
            "alice": (2, 0), "bob": (1, 0), "mallory": (1, 1)}
        assert '<span class="state failed">1</span>' in page  # the refusal stands out
        assert httpx.get(f"{server.base_url}/admin/studies/{study}/access",
                         headers=as_user("alice")).status_code == 403  # the admin scope


def _named_studies(directory: Path) -> list[list[str]]:
    """The studies each audit message of ``directory`` names, in order."""
    return [[o["ParticipantObjectID"] for o in m["ParticipantObjectIdentification"]
             if o["ParticipantObjectIDTypeCode"].get("csd-code") == "110180"]
            for m in read_events(directory)]


def test_a_locked_index_holds_back_the_counts_not_the_trail(tmp_path: Path) -> None:
    """The trail's lines are written while another connection holds the index's write lock
    (which a count waits for, up to SQLite's busy timeout); the counts follow its release."""
    with InProcessService(tmp_path / "data") as service:
        [study] = _studies(service, 1)
        audit = service.data_dir / "audit"
        before = len(_named_studies(audit))
        lock = sqlite3.connect(service.data_dir / "index.sqlite", isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            for _ in range(3):
                assert service.get(f"/dicom-web/studies/{study}").status_code == 200
            wait_for(lambda: _named_studies(audit)[before:] == [[study]] * 3, 3,
                     "the three retrieves in the trail, the index locked")
            assert _page(service, study)[1] == 0  # not counted yet
        finally:
            lock.rollback()
            lock.close()
        wait_for(lambda: [row.count for row in _page(service, study)[0]] == [3], 10,
                 "the retrieves counted once the lock is released")


def test_a_failed_patient_lookup_still_writes_the_event(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def fail(study: str) -> str:
        raise OSError("connection pool exhausted")

    trail = AuditTrail(tmp_path, "PASSERELLE", fail, AuditSettings())
    study = generate_uid()
    trail.record(_event(EventType.INSTANCES_TRANSFERRED, "R", study))
    trail.close()
    [message] = read_events(tmp_path)
    assert [o["ParticipantObjectID"] for o in message["ParticipantObjectIdentification"]] \
        == [study]  # and no patient
    assert f"could not look up the patient of study {study}" in caplog.text


def test_a_full_counting_queue_drops_and_counts_the_accesses(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_MAX_UNCOUNTED", 2)
    release = threading.Event()
    counted: list[Access] = []

    def slow(accesses: list[Access]) -> None:
        release.wait(10)
        counted.extend(accesses)

    metric = "passerelle_study_accesses_unindexed_total"
    before = REGISTRY.get_sample_value(metric) or 0
    trail = AuditTrail(tmp_path, "PASSERELLE", lambda study: "", AuditSettings(),
                       count_accesses=slow)
    study = generate_uid()
    for _ in range(6):
        trail.record(_event(EventType.QUERY, "E", study))
    wait_for(lambda: len(list(read_events(tmp_path))) == 6, 3, "the six events written")
    release.set()
    trail.close()
    dropped = REGISTRY.get_sample_value(metric) - before
    assert dropped >= 1 and len(counted) + dropped == 6
    assert "study access(es) not counted in the index" in caplog.text


def test_a_search_by_study_uid_names_and_counts_its_study(tmp_path: Path) -> None:
    with LocalIssuer() as issuer, InProcessService(tmp_path / "data",
                                                   **issuer.settings()) as service:
        study, other = _studies(service, 2)

        def as_user(subject: str, scope: str = "dicomweb.read") -> dict[str, str]:
            return {"Authorization": f"Bearer {issuer.token(scope, sub=subject)}"}

        audit = service.data_dir / "audit"
        before = len(_named_studies(audit))
        for path in (f"/dicom-web/studies?StudyInstanceUID={study}&includefield=all",
                     f"/dicom-web/series?StudyInstanceUID={study}",
                     f"/dicom-web/instances?0020000d={study}"):
            found = service.get(path, headers=as_user("alice"))
            assert found.status_code == 200, path
            assert {r["0020000D"]["Value"][0] for r in found.json()} == {study}
        operator = as_user("operator", "dicomweb.read passerelle.admin")
        assert service.get(f"/admin/studies?StudyInstanceUID={study}",
                           headers=as_user("carol", "passerelle.admin")).status_code == 200
        # A wildcard, a list: several studies (or none) read, so none named.
        for query in (f"StudyInstanceUID={study[:-2]}*", f"StudyInstanceUID={study},{other}",
                      f"StudyInstanceUID={study[:-1]}?", f"PatientID=*&StudyInstanceUID={study}"
                      f"&0020000D={study}"):
            service.get(f"/dicom-web/studies?{query}", headers=as_user("bob"))
        wait_for(lambda: len(_named_studies(audit)) >= before + 8, 5, "the events")
        assert _named_studies(audit)[before:] == [[study]] * 4 + [[]] * 4

        def users() -> dict[str, tuple[int, str]]:
            listed = service.get(f"/admin/studies/{study}/access", headers=operator).json()
            return {row["user"]: (row["count"], row["last_kind"]) for row in listed["access"]}

        wait_for(lambda: users().get("alice") == (3, "query"), 10, "alice's queries counted")
        assert users()["carol"] == (1, "query") and "bob" not in users()
        assert _page(service, other)[1] == 0
