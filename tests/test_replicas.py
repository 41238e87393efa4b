"""Replicas: two ``passerelle serve`` processes with one PostgreSQL database (the session's
throwaway cluster, tests/postgres.py) and ONE data dir are one gateway. Any replica answers
for any instance, a study is published once whichever replicas received it, a replica
killed while it holds a publication's lease leaves the other to finish it; the data-dir
lock tells replicas from a second service with its own SQLite index."""

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import text

from storage.blobs import BlobStore
from storage.database import Database
from storage.header import read_header
from storage.index import Index
from storage.outbox import Outbox, Publication, State
from storage.recovery import DataDirBusyError, ServiceLock, _still_named, recover
from tests.faulty_proxy import FaultyProxy
from tests.multipart import parts_of
from tests.processes import PasserelleProcess, RegistryProcess, wait_for
from tests.scu import send
from tests.synthetic import ct_slice, national_ct_slice, part10

FAST = {"publish_retry_seconds": "0.2", "publish_retry_max_seconds": "1",
        "registry_timeout": "2", "order_issuer_oid": "1.2.250.1.999.1.1.3",
        "lease_seconds": "2"}
DICOM = 'multipart/related; type="application/dicom"'


class _Replicas:
    """Replicas of one gateway: one database, one data dir; each with its own ports, log
    and settings. Its outbox read as they write it."""

    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.database_url = database_url
        self.started: list[PasserelleProcess] = []
        self.index = Index(Database(database_url))
        self.outbox = Outbox(self.index)

    def start(self, **settings: str) -> PasserelleProcess:
        process = PasserelleProcess(self.data_dir, database_url=self.database_url, **settings)
        process.log_path = self.root / f"replica-{len(self.started) + 1}.log"
        self.started.append(process)
        return process.start()  # type: ignore[return-value]

    def rows(self) -> list[Publication]:
        return self.outbox.listing()

    def wait(self, predicate: Callable[[list[Publication]], bool], what: str,
             timeout: float = 60) -> list[Publication]:
        wait_for(lambda: predicate(self.rows()), timeout, what)
        return self.rows()

    def close(self) -> None:
        for process in reversed(self.started):
            process.stop()
        self.index.close()


@pytest.fixture
def replicas(tmp_path: Path, postgres_cluster: object) -> Iterator[_Replicas]:
    gateway = _Replicas(tmp_path, postgres_cluster.new_database())  # type: ignore[attr-defined]
    yield gateway
    gateway.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(tmp_path / "registry") as process:
        yield process


def _referenced(kos_path: Path) -> set[str]:
    """The SOP Instance UIDs a KOS references (its evidence sequence)."""
    kos = dcmread(kos_path)
    return {ref.ReferencedSOPInstanceUID
            for study in kos.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence}


def _acknowledged(rows: list[Publication]) -> bool:
    return bool(rows) and all(row.state is State.ACKNOWLEDGED for row in rows)


def test_an_instance_stored_through_one_replica_is_retrieved_through_the_other(
        replicas: _Replicas) -> None:
    a, b = replicas.start(), replicas.start()
    study, series = generate_uid(), generate_uid()
    sent = ct_slice(study, series, 1, 1, size=8)
    assert send(a.dicom_port, sent)[0] == 0x0000
    response = httpx.get(f"{b.base_url}/dicom-web/studies/{study}", headers={"Accept": DICOM})
    assert response.status_code == 200
    [(_, body)] = parts_of(response)
    received = dcmread(BytesIO(body))
    assert (received.SOPInstanceUID, received.PixelData) == (sent.SOPInstanceUID,
                                                             sent.PixelData)
    # Commands beside either replica act on the one gateway (its control socket or the
    # database itself).
    assert b.cli("publish", study).returncode == 0
    assert [row.study_uid for row in replicas.rows()] == [study]


def test_each_replica_counts_its_own_metrics_in_a_run_dir_of_its_own(
        replicas: _Replicas) -> None:
    a, b = replicas.start(), replicas.start()
    study, series = generate_uid(), generate_uid()
    for number in (1, 2):
        assert send(a.dicom_port, ct_slice(study, series, number, number, size=8))[0] == 0
    assert send(b.dicom_port, ct_slice(study, series, 3, 3, size=8))[0] == 0
    # A replica starting beside the other neither empties its metrics nor shares its
    # budget tallies: the counts are each replica's own.
    c = replicas.start()
    assert a.metric("passerelle_instances_received_total", protocol="dimse") == 2
    assert b.metric("passerelle_instances_received_total", protocol="dimse") == 1
    assert c.metric("passerelle_instances_received_total", protocol="dimse") == 0
    assert len(list((replicas.data_dir / "run").iterdir())) == 3


def test_a_study_received_through_both_replicas_is_published_once_as_one_kos(
        replicas: _Replicas, registry: RegistryProcess) -> None:
    settings = {**FAST, "registry_url": registry.fhir_url, "stable_seconds": "4"}
    a, b = replicas.start(**settings), replicas.start(**settings)
    study, series = generate_uid(), [generate_uid(), generate_uid()]
    sop_uids = set()
    for number in range(1, 9):  # interleaved: odd numbers through A, even through B
        ds = national_ct_slice(study, series[number % 2], 1 + number % 2, number)
        assert send((a if number % 2 else b).dicom_port, ds)[0] == 0x0000
        sop_uids.add(ds.SOPInstanceUID)
    [row] = replicas.wait(_acknowledged, "the publication")
    assert row.action.value == "publish"
    [document] = registry.documents(study)
    assert row.document_id == f"DocumentReference/{document['id']}"
    assert _referenced(replicas.data_dir / "manifests" / study / f"{row.kos_uid}.dcm") == \
        sop_uids
    time.sleep(2)  # both watchers run again: nothing new, nothing queued again
    assert len(replicas.rows()) == 1 and len(registry.documents(study)) == 1


def _pid_of(replica: str) -> int:
    """The process id in a lease holder's name (<service>:<pid>)."""
    return int(replica.split(":")[1])


def test_the_replica_holding_a_lease_is_killed_and_the_other_finishes_the_row(
        replicas: _Replicas, registry: RegistryProcess) -> None:
    """A's request reaches the registry, its answer never comes back; A is killed while it
    holds the lease. B takes the row over once the lease expires, looks the manifest up in
    the registry and finds it: one DocumentReference, nothing sent twice."""
    study = generate_uid()
    with FaultyProxy(upstream=registry.http_port) as proxy:
        proxy.mode = "lose-answer"
        a = replicas.start(**{**FAST, "registry_url": proxy.url, "registry_timeout": "60",
                              "stable_seconds": "1"})
        assert send(a.dicom_port, national_ct_slice(study, generate_uid(), 1, 1))[0] == 0
        wait_for(lambda: len(registry.documents(study)) == 1, 30, "the registered document")
        [held] = replicas.rows()
        assert held.state is State.SENT and held.leased_by
        b = replicas.start(**{**FAST, "registry_url": registry.fhir_url, "stable_seconds": "1"})
        time.sleep(3 * float(FAST["lease_seconds"]))  # A renews: B leaves the row alone
        [row] = replicas.rows()
        assert (row.state, row.leased_by, row.attempts) == (State.SENT, held.leased_by, 1)
        a.stop(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # the lease holder, were it a child
            os.kill(_pid_of(held.leased_by), signal.SIGKILL)
        [row] = replicas.wait(_acknowledged, "the row finished by the other replica")
        assert "earlier attempt" in row.response  # looked up, not sent again
        assert (row.attempts, row.leased_by) == (2, "")
        assert proxy.requests.count("POST /fhir") == 1
        [document] = registry.documents(study)
        assert row.document_id == f"DocumentReference/{document['id']}"
        assert b.healthy()
    # A's lock file is left: the next replica to start checks the files A may have left.
    restarted = replicas.start(**FAST)
    assert "previous run did not stop cleanly" in restarted.log()


def test_a_replica_ends_at_start_the_leases_of_dead_replicas_only(
        replicas: _Replicas, registry: RegistryProcess) -> None:
    """Which replicas are gone is told by their locks, never by a pid: a live replica whose
    pid means nothing here (another container, the same host name) keeps its lease; a
    dead one's lock, left unlocked, is taken over and its lease ended at once, long before
    it would expire."""
    quiet = {**FAST, "stable_seconds": "3600"}
    a = replicas.start(**quiet)  # no registry: rows are queued, not sent
    studies = [generate_uid(), generate_uid()]
    for study in studies:
        assert send(a.dicom_port, national_ct_slice(study, generate_uid(), 1, 1))[0] == 0
        assert a.cli("publish", study).returncode == 0
    a.stop()
    live = ServiceLock(replicas.data_dir, replica=True)
    live.acquire()
    (replicas.data_dir / "replicas" / "elsewhere-7-0dead.lock").touch()
    holders = {studies[0]: "elsewhere-7-0dead:7", studies[1]: f"{live.name}:{(1 << 22) + 1}"}
    with replicas.index.transaction() as db:
        for study, holder in holders.items():
            db.execute(text("UPDATE publications SET leased_by = :holder, "
                            "lease_expires_at = :until WHERE study_uid = :study"),
                       {"holder": holder, "until": time.time() + 3600, "study": study})
    try:
        b = replicas.start(**{**quiet, "registry_url": registry.fhir_url})
        replicas.wait(lambda rows: any(row.state is State.ACKNOWLEDGED for row in rows),
                      "the dead replica's row published")
        assert "released the lease(s) of 1 publication(s) held by elsewhere-7-0dead:7" \
            in b.log()
        by_study = {row.study_uid: row for row in replicas.rows()}
        assert by_study[studies[0]].state is State.ACKNOWLEDGED
        assert (by_study[studies[1]].state, by_study[studies[1]].leased_by) == \
            (State.PENDING, holders[studies[1]])
        assert len(registry.documents(studies[0])) == 1
        assert registry.documents(studies[1]) == []
    finally:
        live.release()


def test_a_service_with_its_own_sqlite_index_cannot_join_replicas_nor_they_it(
        replicas: _Replicas, tmp_path: Path) -> None:
    def lone() -> PasserelleProcess:
        process = PasserelleProcess(replicas.data_dir)
        process.log_path = tmp_path / "lone.log"
        return process

    replica = replicas.start()
    with pytest.raises(RuntimeError, match="used by another passerelle serve"):
        lone().start()
    replica.stop()
    with lone() as lone_service:
        with pytest.raises(RuntimeError, match="with its own SQLite index"):
            replicas.start()
        assert lone_service.healthy()


def test_replicas_share_the_data_dir_lock_a_lone_service_has_it_alone(tmp_path: Path) -> None:
    first, second = ServiceLock(tmp_path, replica=True), ServiceLock(tmp_path, replica=True)
    first.acquire()
    second.acquire()
    assert first.previous_stop_was_clean and second.previous_stop_was_clean
    assert ServiceLock.is_held(tmp_path)
    with pytest.raises(DataDirBusyError):
        ServiceLock(tmp_path).acquire()
    first.release()
    second.release()
    assert not ServiceLock.is_held(tmp_path)
    assert list((tmp_path / "replicas").iterdir()) == []  # clean stops leave nothing
    lone = ServiceLock(tmp_path)
    lone.acquire()
    with pytest.raises(DataDirBusyError, match="its own SQLite index"):
        ServiceLock(tmp_path, replica=True).acquire()
    lone.release()


def test_two_services_of_two_data_dirs_cannot_share_one_sqlite_index(tmp_path: Path) -> None:
    """An SQLite index outside the data dir (database_url) could be named by a second
    service with a data dir of its own: its file is claimed too, or both would publish
    its rows and end each other's leases."""
    index_file = tmp_path / "shared.sqlite"
    first = ServiceLock(tmp_path / "a", index_file=index_file)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first.acquire()
    second = ServiceLock(tmp_path / "b", index_file=index_file)
    with pytest.raises(DataDirBusyError, match=r"shared\.sqlite is used by another"):
        second.acquire()
    assert not ServiceLock.is_held(tmp_path / "b")  # the data dir's lock given back
    first.release()
    second.acquire()
    second.release()


def test_a_dead_replica_is_checked_for_by_one_replica(tmp_path: Path) -> None:
    """The lock file of a replica that died (left, unlocked) makes the next replica recover;
    one replica takes it, and removes it at its clean stop."""
    (tmp_path / "replicas").mkdir()
    (tmp_path / "replicas" / "host-1234-dead.lock").touch()
    taker, other = ServiceLock(tmp_path, replica=True), ServiceLock(tmp_path, replica=True)
    taker.acquire()
    other.acquire()
    assert (taker.previous_stop_was_clean, other.previous_stop_was_clean) == (False, True)
    taker.release()
    other.release()
    assert list((tmp_path / "replicas").iterdir()) == []
    after = ServiceLock(tmp_path, replica=True)
    after.acquire()
    assert after.previous_stop_was_clean
    after.release(clean=False)  # a stop that did not drain: the next replica checks
    last = ServiceLock(tmp_path, replica=True)
    last.acquire()
    assert not last.previous_stop_was_clean
    last.release()


def test_a_lock_file_removed_by_a_clean_stop_is_not_taken_for_a_dead_replica(
        tmp_path: Path) -> None:
    """A file opened just before its replica removed it at a clean stop (then locked once
    that replica closed it) is told from a dead replica's: its name is gone or another's."""
    path = tmp_path / "host-1-a.lock"
    path.touch()
    fd = os.open(path, os.O_RDWR)
    assert _still_named(path, fd)
    path.unlink()
    assert not _still_named(path, fd)
    path.touch()  # the name taken again by a new replica's file
    assert not _still_named(path, fd)
    os.close(fd)


def test_replicas_recover_one_after_the_other(tmp_path: Path) -> None:
    blobs, index = BlobStore(tmp_path), Index(tmp_path / "index.sqlite")
    fd = os.open(tmp_path / "recovery.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another replica recovering
    second = threading.Thread(target=recover, args=(blobs, index))
    second.start()
    second.join(1)
    assert second.is_alive()  # waits for the first
    os.close(fd)
    second.join(30)
    assert not second.is_alive()
    index.close()


@pytest.mark.parametrize("outcome", ["indexed", "deleted"])
def test_recovery_leaves_a_file_a_live_replica_is_writing_to_that_replica(
        tmp_path: Path, outcome: str) -> None:
    """A live replica has renamed an instance's file into place and holds the instance's
    lock until its index commit (``indexed``), or until it deletes the file after a failed
    index write (``deleted``): recovery waits for that lock, then indexes nothing."""
    blobs, index = BlobStore(tmp_path), Index(tmp_path / "index.sqlite")
    try:
        data = part10(ct_slice(generate_uid(), generate_uid(), 1, 1, size=8))
        record = read_header(data)
        relative = blobs.relative_path(record.study_uid, record.series_uid, record.sop_uid)
        found: list[dict[str, int]] = []
        with index.database.lock(f"instance {record.sop_uid}"):
            blobs.put(relative, [data])
            recovering = threading.Thread(
                target=lambda: found.append(recover(blobs, index).counts()))
            recovering.start()
            recovering.join(1)
            assert recovering.is_alive()  # waits for the writer
            if outcome == "indexed":
                index.add_instance(record, relative, len(data), source="replica")
            else:
                blobs.delete(relative)
        recovering.join(30)
        assert found == [{"reindexed": 0, "quarantined": 0, "missing": 0}]
        stored = index.find_instance(record.sop_uid)
        assert (stored and stored.path) == (relative if outcome == "indexed" else None)
    finally:
        index.close()


def test_a_replica_purges_only_the_temporary_files_no_write_touches(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    live, left = blobs.temporary(), blobs.temporary()
    live.write(b"a reception of another replica, in flight")
    left.close()
    hours_ago = time.time() - 2 * 3600
    os.utime(left.path, (hours_ago, hours_ago))
    lock = ServiceLock(tmp_path, replica=True)
    lock.acquire()
    assert lock.purge_temporary(blobs) == 1
    assert live.path.exists() and not left.path.exists()
    lock.release()
    live.discard()
