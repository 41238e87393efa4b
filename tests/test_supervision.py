"""``passerelle serve`` as a supervisor of processes (gateway.supervisor): the DICOM
receiver, several HTTP workers on one port and the background worker, each restarted when
killed, all drained on SIGTERM, none left behind when the supervisor itself is killed;
metrics and /health across processes; what crosses processes (the publisher's wake-up, the
shared resource budget, the audit trail)."""

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest
from pydicom.uid import generate_uid

from gateway.liveness import Board
from gateway.security.audit import AuditEvent, AuditTrail, EventType, Outcome, read_events
from gateway.service import _wake_on_pokes, _waker
from gateway.shared_tally import SharedTally, clear_slot, create_tally
from tests.processes import PasserelleProcess, RegistryProcess, wait_for
from tests.scu import send
from tests.synthetic import ct_slice, national_ct_slice

DICOM_FILES = 'multipart/related; type="application/dicom"'


def _processes(server: PasserelleProcess) -> dict[str, list[int]]:
    return httpx.get(f"{server.base_url}/health").json()["processes"]


def _children(server: PasserelleProcess) -> set[int]:
    """The pids of the service's processes, as psutil sees the supervisor's children."""
    assert server.proc is not None
    roles = _processes(server)
    children = {child.pid for child in psutil.Process(server.proc.pid).children()}
    pids = {pid for pids in roles.values() for pid in pids}
    assert pids <= children, (pids, children)
    return pids


def _serving_pid(port: int) -> int:
    """The pid of the HTTP worker that accepted a new connection (psutil sees who holds
    its server side), once a request on it is answered."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        client = sock.getsockname()
        for connection in psutil.net_connections("tcp"):
            if connection.raddr and tuple(connection.raddr) == client and connection.pid:
                return connection.pid
    raise AssertionError("no process holds the connection")


def test_workers_share_the_port_and_metrics_count_every_process(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", http_workers="3", dicom_receivers="2") as server:
        # Healthy once each role serves; the others of a role may beat a moment later.
        wait_for(lambda: [len(pids) for pids in _processes(server).values()] == [2, 1, 3], 30,
                 "every process serving")
        roles = _processes(server)
        assert len(roles["http"]) == 3 and len(roles["dicom"]) == 2
        assert len(roles["background"]) == 1
        assert len(_children(server)) == 6  # six distinct processes under the supervisor
        answering: set[int] = set()
        for _ in range(200):  # the kernel hands each connection to one worker
            answering.add(_serving_pid(server.http_port))
            if len(answering) > 1:
                break
        assert len(answering) > 1 and answering <= set(roles["http"])

        study = generate_uid()
        slices = [ct_slice(study, generate_uid(), 1, n) for n in range(1, 4)]
        for ds in slices:
            assert send(server.dicom_port, ds)[0] == 0x0000
        found = httpx.get(f"{server.base_url}/dicom-web/studies/{study}",
                          headers={"Accept": DICOM_FILES})
        assert found.status_code == 200
        assert all(ds.SOPInstanceUID.encode() in found.content for ds in slices)
        # Counted in the DICOM receivers, shown by whichever worker answers the scrape.
        for _ in range(6):
            assert server.metric("passerelle_instances_received_total",
                                 protocol="dimse") == 3


def test_each_killed_process_is_started_again_and_nothing_acknowledged_is_lost(
        tmp_path: Path) -> None:
    study = generate_uid()
    stored: list[str] = []
    with PasserelleProcess(tmp_path / "data", http_workers="2", dicom_receivers="2") as server:
        for role in ("http", "dicom", "background"):
            ds = ct_slice(study, generate_uid(), 1, len(stored) + 1)
            assert send(server.dicom_port, ds)[0] == 0x0000
            stored.append(ds.SOPInstanceUID)
            [victim, *_] = _processes(server)[role]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda role=role, victim=victim: server.healthy()
                     and _processes(server)[role]
                     and victim not in _processes(server)[role]
                     and len(_processes(server)["http"]) == 2
                     and len(_processes(server)["dicom"]) == 2, 30, f"{role} restarted")
            assert f"{role} process (pid {victim}) was killed by SIGKILL" in server.log()
            assert server.metric("passerelle_process_restarts_total", role=role) == 1
        listed = httpx.get(f"{server.base_url}/dicom-web/studies/{study}/instances").json()
        assert sorted(item["00080018"]["Value"][0] for item in listed) == sorted(stored)
        assert server.stop() == 0
    # A process died during the run: the next start checks the index against the files.
    assert (tmp_path / "data" / "serve.lock").read_text() == "running"


def test_a_process_dying_again_and_again_waits_longer_each_time(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", http_workers="1", dicom_receivers="1") as server:
        for delay in ("0.5", "1.0", "2.0"):
            [victim] = _processes(server)["dicom"]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda victim=victim: server.healthy()
                     and _processes(server)["dicom"] not in ([], [victim]), 30,
                     "the DICOM receiver started again")
            assert (f"dicom process (pid {victim}) was killed by SIGKILL: starting it again "
                    f"in {delay} s") in server.log()
        assert server.metric("passerelle_process_restarts_total", role="dicom") == 3


def test_http_workers_may_open_files_to_the_hard_limit_pynetdicom_stays_under_1024(
        tmp_path: Path) -> None:
    """The supervisor raises the soft limit of open files to the hard one (a WADO-RS study
    retrieve holds its files open); the processes using pynetdicom, whose ``select()``
    takes no descriptor of 1024 or more, keep theirs at 1024."""
    hard = psutil.Process().rlimit(psutil.RLIMIT_NOFILE)[1]
    if hard != psutil.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit of open files is {hard}: nothing to raise")
    with PasserelleProcess(tmp_path / "data", http_workers="2") as server:
        processes = _processes(server)
        limits = {role: {psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
                         for pid in pids} for role, pids in processes.items()}
    assert limits["http"] == {(hard, hard)}
    assert limits["dicom"] == limits["background"] == {(1024, hard)}


def test_the_descriptor_share_of_responses_is_read_once_the_limit_is_raised() -> None:
    """gateway.web.dicomweb.stored_files is imported before the supervisor raises the
    limit: its share of it is read at first use, not at import."""
    program = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 8192))
        from gateway.web.dicomweb.stored_files import DESCRIPTORS
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
        print(DESCRIPTORS.capacity)
    """)
    if psutil.Process().rlimit(psutil.RLIMIT_NOFILE)[1] < 8192:
        pytest.skip("the hard limit of open files is under 8192")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, check=True, cwd=Path(__file__).parent.parent)
    assert done.stdout.strip() == str(8192 // 4)


def test_health_names_a_role_whose_process_stops_serving(tmp_path: Path) -> None:
    """A process that hangs (here: stopped) stops beating: /health says 503 and names its
    role once its last beat is STALE_SECONDS old, and 200 again once it serves."""
    with PasserelleProcess(tmp_path / "data", http_workers="1", dicom_receivers="1") as server:
        [dicom] = _processes(server)["dicom"]
        os.kill(dicom, signal.SIGSTOP)
        try:
            wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 503, 30,
                     "/health to see the DICOM receiver hang")
            body = httpx.get(f"{server.base_url}/health").json()
            assert body["unavailable"] == ["dicom"] and body["dicom"] is False
            assert body["processes"]["dicom"] == [] and body["background"] is True
        finally:
            os.kill(dicom, signal.SIGCONT)
        wait_for(server.healthy, 30, "the DICOM receiver serving again")
        assert _processes(server)["dicom"] == [dicom]  # the same process: it only hung


def test_sigterm_drains_a_response_in_flight_then_exits_zero_with_no_child_left(
        tmp_path: Path) -> None:
    study = generate_uid()
    with PasserelleProcess(tmp_path / "data", http_workers="2") as server:
        assert server.proc is not None
        slices = [ct_slice(study, generate_uid(), 1, n, size=1024) for n in range(1, 13)]
        for ds in slices:  # 2 MiB each: more than the socket buffers hold
            assert send(server.dicom_port, ds)[0] == 0x0000
        children = [psutil.Process(pid) for pid in _children(server)]
        with httpx.stream("GET", f"{server.base_url}/dicom-web/studies/{study}",
                          headers={"Accept": DICOM_FILES}, timeout=60) as response:
            chunks = response.iter_bytes()
            body = bytearray(next(chunks))
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(1)  # the service stops meanwhile; the response goes on
            for chunk in chunks:
                body += chunk
        assert all(ds.SOPInstanceUID.encode() in body for ds in slices)
        assert len(body) > 12 * 2 * 1024 * 1024
        assert server.stop() == 0
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    assert "HTTP worker drained" in server.log()
    assert (tmp_path / "data" / "serve.lock").read_text() == "stopped"


@pytest.mark.slow  # waits out the bound of a stop: 30 s
def test_a_stop_signal_repeated_until_the_service_is_gone_still_ends_it_cleanly(
        tmp_path: Path) -> None:
    """An impatient operator (or a supervisor of its own) sends SIGTERM again and again: the
    first one stops the service, the others neither cut the drain nor kill the supervisor
    as Python exits (it restores the default action of its signal handlers there)."""
    server = PasserelleProcess(tmp_path / "data", http_workers="1").start()
    assert server.proc is not None
    while server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    assert server.proc.returncode == 0
    assert "stopped" in server.log()


def test_a_process_that_does_not_stop_is_killed_then_the_supervisor_exits_zero(
        tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", http_workers="1", dicom_receivers="1",
                           shutdown_grace_seconds="0") as server:
        [dicom] = _processes(server)["dicom"]
        children = [psutil.Process(pid) for pid in _children(server)]
        os.kill(dicom, signal.SIGSTOP)  # a SIGTERM stays pending: it never drains
        assert server.stop(timeout=60) == 0
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    assert f"dicom process (pid {dicom}) did not stop within 30 s: killed" in server.log()
    assert (tmp_path / "data" / "serve.lock").read_text() == "running"


def test_a_killed_supervisor_leaves_no_process_behind(tmp_path: Path) -> None:
    server = PasserelleProcess(tmp_path / "data", http_workers="2").start()
    children = [psutil.Process(pid) for pid in _children(server)]
    server.stop(signal.SIGKILL)
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive
    with socket.socket() as sock:  # nobody keeps the HTTP port
        sock.bind(("127.0.0.1", server.http_port))


def test_an_admin_publish_through_an_http_worker_reaches_the_registry(
        tmp_path: Path) -> None:
    study = generate_uid()
    with RegistryProcess(tmp_path / "registry") as registry, PasserelleProcess(
            tmp_path / "data", registry_url=registry.fhir_url, stable_seconds="3600",
            http_workers="2", order_issuer_oid="1.2.250.1.999.1.1.3") as server:
        assert send(server.dicom_port, national_ct_slice(study, generate_uid(), 1, 1))[0] == 0
        response = httpx.post(f"{server.base_url}/admin/studies/{study}/publish")
        assert response.status_code == 202
        wait_for(lambda: registry.documents(study), 30, "the manifest in the registry")
        assert len(registry.documents(study)) == 1


def test_a_poke_from_an_http_worker_wakes_the_publisher() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    woken = multiprocessing.Event()
    _wake_on_pokes(reader, woken.set)
    wake = _waker(writer)
    for _ in range(100_000):  # more than a pipe holds: never blocks
        wake()
    assert woken.wait(5)


def _hold(path: Path, slot: int, size: int, capacity: int,
          result: "multiprocessing.Queue[bool]") -> None:
    result.put(SharedTally(path, slot).try_hold(size, capacity))


def test_a_budget_tally_holds_for_every_process_and_frees_a_dead_ones_slot(
        tmp_path: Path) -> None:
    path = tmp_path / "ingest.tally"
    create_tally(path, 3)
    mine = SharedTally(path, 0)
    assert mine.try_hold(60, 100)
    spawn = multiprocessing.get_context("spawn")
    result = spawn.Queue()
    for size, fits in ((50, False), (40, True)):
        other = spawn.Process(target=_hold, args=(path, 1, size, 100, result))
        other.start()
        other.join()
        assert result.get(timeout=5) is fits
    assert mine.total() == 100
    assert not mine.try_hold(61, 100)
    clear_slot(path, 1)  # its process is gone
    assert mine.try_hold(100, 100) and mine.total() == 100


def _write_events(directory: Path, writer: int, count: int) -> None:
    from gateway.config import AuditSettings

    trail = AuditTrail(directory, "PASSERELLE", lambda study: "",
                       AuditSettings(max_bytes=5_000, backups=1000))
    for n in range(count):
        trail.record(AuditEvent(EventType.INSTANCES_ACCESSED, "R", Outcome.SUCCESS,
                                f"writer-{writer}", "127.0.0.1", f"1.2.3.{writer}.{n}"))
    trail.close()


def test_processes_appending_to_one_audit_trail_lose_and_mix_no_line(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    spawn = multiprocessing.get_context("spawn")
    writers = [spawn.Process(target=_write_events, args=(directory, n, 400)) for n in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join()
        assert process.exitcode == 0
    events = list(read_events(directory))  # every line parses as one message
    assert len(events) == 1600
    assert len(list(directory.glob("audit.jsonl.*"))) > 1  # rotated while others wrote


def test_the_board_forgets_a_cleared_process() -> None:
    board = Board.create(["dicom", "background", "http"])
    board.beat(2)
    assert board.serving()["http"] == [os.getpid()]
    board.clear(2)
    assert board.serving() == {"dicom": [], "background": [], "http": []}
