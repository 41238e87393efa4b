"""The socket options of the DICOM receiver (gateway.dicom.server), read on the accepted
socket inside the receiving process while dcmtk's storescu sends a study over one
association.

A sender that keeps Nagle's algorithm on (dcmtk's default) holds each small segment until the
previous one is acknowledged; Linux delays that acknowledgement once the receiver has sent an
answer, so without TCP_QUICKACK each instance waits the delayed-ACK time (50 ms an instance
measured with 64x64 slices, bench/ingest.py). QUICKACK is not sticky: the kernel delays again
after each response sent, and reading it back tells nothing (the delayed-ACK timer, once
fired, ends the delaying too), so the test counts the receiver's setsockopt calls.
"""

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.transport import ThreadedAssociationServer

from gateway.dicom.pynetdicom_adapter import register_server
from gateway.dicom.server import ConnectionLimits, GuardedAssociationServer, received_dataset
from gateway.imaging.budget import ByteBudget
from storage.blobs import BlobStore
from tests.processes import PasserelleProcess
from tests.synthetic import write_ct_study

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


@dataclass
class Seen:
    """What the receiving process did: the socket of each C-STORE (file descriptor,
    TCP_NODELAY read back), and every TCP option it set (file descriptor, option, value)."""

    stores: list[tuple[int, int]] = field(default_factory=list)
    set_options: list[tuple[int, int, int]] = field(default_factory=list)

    def quick_acks(self, fd: int) -> int:
        """How many times TCP_QUICKACK was set on ``fd``."""
        return sum(1 for number, option, value in self.set_options
                   if number == fd and option == _QUICKACK and value == 1)


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Seen]]:
    """A GuardedAssociationServer on loopback that records what ``Seen`` says: (port, seen)."""
    seen = Seen()
    setsockopt = socket.socket.setsockopt

    def recording(sock: socket.socket, level: int, option: int, value: Any) -> None:
        if level == socket.IPPROTO_TCP:
            seen.set_options.append((sock.fileno(), option, value))
        setsockopt(sock, level, option, value)

    monkeypatch.setattr(socket.socket, "setsockopt", recording)

    def on_store(event: evt.Event) -> Dataset:
        sock = event.assoc.dul.socket.socket
        seen.stores.append((sock.fileno(),
                            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        received_dataset(event).close()
        status = Dataset()
        status.Status = 0x0000
        return status

    ae = AE("PASSERELLE")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    server: ThreadedAssociationServer = ae.make_server(
        ("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store)],
        server_class=GuardedAssociationServer,
        limits=ConnectionLimits(per_client=4, max_associations=4, max_pending=4,
                                artim_seconds=30, max_pdu_bytes=1 << 20),
        new_blob=BlobStore(tmp_path / "blobs").temporary, max_instance_bytes=1 << 24,
        ingest=ByteBudget("ingest_bytes", "ingest_bytes_in_flight", 1 << 26),
        on_refused=lambda host: None, on_flooded=lambda: None)
    register_server(ae, server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        ae.shutdown()
        thread.join(10)


def test_nodelay_on_the_accepted_socket_and_quickack_again_for_each_pdu(
        tmp_path: Path, receiver: tuple[int, Seen]) -> None:
    port, seen = receiver
    study = tmp_path / "study"
    write_ct_study(study, series=1, per_series=6, size=64)
    env = {"PATH": "/usr/bin:/bin"}  # no TCP_NODELAY: dcmtk keeps Nagle's algorithm on
    result = subprocess.run(["storescu", "-aec", "PASSERELLE", "127.0.0.1", str(port),
                             "+sd", str(study)], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert len(seen.stores) == 6
    (fd, nodelay), = set(seen.stores)  # one association, one socket
    assert nodelay
    if _QUICKACK is not None:  # Linux
        # Each C-STORE is at least two PDUs (command, data set), plus the association's own.
        assert seen.quick_acks(fd) >= 2 * 6, seen.set_options


def test_open_associations_waiting_for_requests_cost_the_receiver_almost_no_cpu(
        tmp_path: Path) -> None:
    """pynetdicom's threads poll every millisecond (two an association: 4 % of a core each
    while idle, 30 % for eight); the receiver's wait on the socket and on its queues
    instead. Eight associations open and silent for three seconds."""
    with PasserelleProcess(tmp_path / "data", dicom_receivers="1") as server:
        dicom = psutil.Process(
            httpx.get(f"{server.base_url}/health").json()["processes"]["dicom"][0])
        ae = AE()
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        associations = [ae.associate("127.0.0.1", server.dicom_port,
                                     ae_title=server.ae_title) for _ in range(8)]
        try:
            assert all(assoc.is_established for assoc in associations)
            before = sum(dicom.cpu_times()[:2])
            time.sleep(3)
            used = sum(dicom.cpu_times()[:2]) - before
            # Still served at once: a C-ECHO on one of them.
            assert associations[0].send_c_echo().Status == 0x0000
        finally:
            for assoc in associations:
                assoc.release()
    assert used < 0.1 * 3, f"{used:.2f} s of CPU in 3 s for 8 idle associations"
