"""Several DICOM receiver processes on one port (gateway.supervisor, gateway.dicom.slots):
associations are spread over them, the association limits hold over all of them together,
and one receiver stopping or dying leaves the port to the others."""

import contextlib
import os
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from pydicom.uid import generate_uid
from pynetdicom import Association

from gateway.dicom import slots
from gateway.dicom.slots import AssociationSlots
from gateway.shared_tally import SharedTally, create_tally
from tests.processes import PasserelleProcess, wait_for
from tests.scu import associate, send
from tests.synthetic import ct_slice


def _receivers(server: PasserelleProcess, count: int = 0) -> list[int]:
    """The pids of the receivers serving now; first, until ``count`` of them serve (at nice
    10, a receiver can beat after the service already answers healthy)."""
    if count:
        wait_for(lambda: len(_receivers(server)) == count, 30, f"{count} receivers serving")
    return httpx.get(f"{server.base_url}/health").json()["processes"]["dicom"]


def _holder(assoc: Association) -> int:
    """The pid of the process holding the server side of ``assoc``'s connection."""
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    client = assoc.dul.socket.socket.getsockname()
    for connection in psutil.net_connections("tcp"):
        if connection.raddr and tuple(connection.raddr) == client and connection.pid:
            return connection.pid
    raise AssertionError("no process holds the connection")


@contextlib.contextmanager
def _held(port: int, count: int) -> Iterator[list[Association]]:
    """``count`` associations opened one after the other and held open."""
    held: list[Association] = []
    try:
        for _ in range(count):
            held.append(associate(port))
        yield held
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


def _echo(port: int) -> bool:
    assoc = associate(port)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def test_associations_held_at_once_are_spread_over_the_receivers(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", dicom_receivers="2",
                           http_workers="1") as server:
        receivers = _receivers(server, 2)
        with _held(server.dicom_port, 4) as held:
            assert all(assoc.is_established for assoc in held)
            holders = Counter(_holder(assoc) for assoc in held)
            assert set(holders) == set(receivers), holders  # each receiver serves some
            for assoc in held:  # and each association is served
                assert assoc.send_c_echo().Status == 0
        study = generate_uid()
        for number in range(1, 7):
            assert send(server.dicom_port, ct_slice(study, generate_uid(), 1, number))[0] == 0
        # Counted in whichever receiver stored each, added up by the worker that answers.
        assert server.metric("passerelle_instances_received_total", protocol="dimse") == 6


def test_the_association_limits_hold_over_every_receiver_together(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", dicom_receivers="2", http_workers="1",
                           max_associations="2", max_associations_per_client="8") as server:
        _receivers(server, 2)
        with _held(server.dicom_port, 2) as held:
            assert all(assoc.is_established for assoc in held)
            assert len({_holder(assoc) for assoc in held}) == 2  # one in each: 1 < 2 there
            surplus = associate(server.dicom_port)
            assert surplus.is_rejected  # the service as a whole serves 2 already
        assert _echo(server.dicom_port)  # their slots are free again
    with PasserelleProcess(tmp_path / "data", dicom_receivers="2", http_workers="1",
                           max_associations_per_client="1") as server:
        with _held(server.dicom_port, 1) as held:
            assert held[0].is_established
            surplus = associate(server.dicom_port)
            assert surplus.is_rejected
            rejection = surplus.acceptor.primitive
            assert (rejection.result, rejection.result_source, rejection.diagnostic) == \
                (2, 3, 2)  # transient, local limit exceeded (PS3.8 9.3.4)
        assert _echo(server.dicom_port)


def test_a_receiver_that_stops_or_dies_leaves_the_port_to_the_others(tmp_path: Path) -> None:
    """A receiver stopping closes its copy of the listening socket only: a shutdown() of
    the socket they share would stop every receiver accepting. One killed holding an
    association gives its slots back (max_associations 1 here)."""
    with PasserelleProcess(tmp_path / "data", dicom_receivers="2", http_workers="1",
                           max_associations="1") as server:
        first, _ = _receivers(server, 2)
        os.kill(first, signal.SIGTERM)
        wait_for(lambda: first not in _receivers(server), 30, "the receiver to stop")
        for _ in range(10):
            assert _echo(server.dicom_port)
        _receivers(server, 2)  # the one that stopped is started again
        with _held(server.dicom_port, 1) as held:
            victim = _holder(held[0])
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: victim not in _receivers(server), 30, "the receiver to die")
            assert _echo(server.dicom_port)  # its association no longer counts
        assert f"dicom process (pid {victim}) was killed by SIGKILL" in server.log()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_stopping_service_refuses_new_connections_while_it_drains(tmp_path: Path) -> None:
    """Every process holds a copy of both listening sockets when it is forked: each closes
    those it does not serve, and the supervisor its own once it has signalled the others, so
    the ports refuse connections during the drain instead of queueing them for nobody."""
    server = PasserelleProcess(tmp_path / "data", dicom_receivers="2", http_workers="2",
                               shutdown_grace_seconds="60").start()
    assert server.proc is not None
    _receivers(server, 2)
    with _held(server.dicom_port, 1) as held:
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _refused(server.dicom_port) and _refused(server.http_port), 20,
                 "both ports to refuse connections")
        assert server.proc.poll() is None  # still draining the held association
        assert held[0].send_c_echo().Status == 0  # which is still served
    assert server.stop(timeout=60) == 0


def test_dicom_on_the_ipv6_wildcard_takes_ipv4_senders_too(tmp_path: Path) -> None:
    """As pynetdicom's own socket did: ``dicom_host = "::"`` is dual stack where the
    system allows it (net.ipv6.bindv6only = 0, Linux's default)."""
    if not socket.has_ipv6 or Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() != "0":
        pytest.skip("no dual-stack IPv6 sockets here")
    with PasserelleProcess(tmp_path / "data", dicom_host="::", dicom_receivers="1",
                           http_workers="1") as server:
        assert _echo(server.dicom_port)  # to 127.0.0.1


def _slots_in(tmp_path: Path, slot: int, peers: list[int]) -> AssociationSlots:
    tallies = [tmp_path / "pending.tally", tmp_path / "served.tally"]
    for tally in tallies:
        if not tally.exists():
            create_tally(tally, 3)
    return AssociationSlots(8, 8, SharedTally(tallies[0], slot), SharedTally(tallies[1], slot),
                            lambda: peers)


def test_a_busier_receiver_leaves_a_connection_to_an_idle_peer_for_a_moment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(slots.time, "monotonic", lambda: now[0])
    busy, idle = _slots_in(tmp_path, 0, [1]), _slots_in(tmp_path, 1, [0])
    assert not busy.should_defer() and not idle.should_defer()  # both idle: either takes it
    assert busy.served.take()
    assert busy.should_defer() and not idle.should_defer()
    for _ in range(9):  # the accept loop looks again every 2 ms while it waits
        now[0] += 0.002
        assert busy.should_defer()
    now[0] += 0.0021  # nobody took it in DEFER_SECONDS: the busy one does
    assert not busy.should_defer()
    busy.stop_waiting()
    assert busy.should_defer()  # the next connection waits afresh
    now[0] += 5  # a peer took that one; another connection, much later
    assert busy.should_defer()  # waits afresh too
    now[0] += slots.DEFER_SECONDS / 4
    assert busy.should_defer()  # still the same wait
    assert idle.pending.take()
    assert not busy.should_defer()  # as busy as each other now
    assert not _slots_in(tmp_path, 0, []).should_defer()  # no live peer: nobody to wait for
    assert busy.pending.total() == 1 and busy.served.total() == 1
