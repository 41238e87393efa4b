"""The DICOM port under resource attacks, against a running ``passerelle serve``: a large
C-STORE is streamed to disk (RSS measured on the server process), max_instance_bytes bounds
every C-STORE (a deflated one once inflated, inflated as a stream), the structure of a data
set is bounded before it is parsed, malformed or endless DIMSE messages abort their
association and free its slots, pipelined C-STOREs are all stored, and connections that
close, stay silent or are over their client's limit leave room for everyone else. Times are
measured and printed, not asserted; RSS bounds are."""

import contextlib
import functools
import math
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import Association
from pynetdicom.dsutils import encode

from storage.part10 import dataset_bytes, dataset_offset, file_preamble_and_meta
from tests.processes import PasserelleProcess, wait_for
from tests.scu import associate, c_store_pdus, send
from tests.service_watch import PeakRss
from tests.synthetic import ct_slice, part10

ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # item of undefined length (PS3.5 7.5)
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
PLACEHOLDER = b"\x08\x00\x40\x11SQ\x00\x00\x00\x00\x00\x00"  # empty ReferencedImageSequence


def _reference(element: int = 0x1150) -> bytes:
    """A (0008,``element``) UI element, by default ReferencedSOPClassUID."""
    return struct.pack("<HH2sH", 0x0008, element, b"UI", 6) + b"1.2.3\x00"


def _sequence(items: bytes) -> bytes:
    """A ReferencedImageSequence of undefined length holding the encoded ``items``."""
    return b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + items + SEQUENCE_END


def _nested(depth: int) -> bytes:
    """Sequences nested ``depth`` deep, one item each."""
    inner = _reference() if depth == 1 else _nested(depth - 1)
    return _sequence(ITEM + inner + ITEM_END)


def _instance_with(tmp_path: Path, sequence: bytes) -> tuple[Path, str]:
    """A small CT slice whose data set holds ``sequence``, written as a file; and its study."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8, ReferencedImageSequence=[])
    data = part10(ds)
    at = data.index(PLACEHOLDER)
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(data[:at] + sequence + data[at + len(PLACEHOLDER):])
    return path, ds.StudyInstanceUID


def _stored(server: PasserelleProcess, study: str) -> list[Path]:
    assert list((server.data_dir / "tmp").iterdir()) == []  # no temporary file left either
    return list(server.data_dir.glob(f"studies/{study}/*/*.dcm"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasserelleProcess]:
    """One service for the tests that need no settings of their own: default association
    limits (16, 8 per client), a short ARTIM."""
    with PasserelleProcess(tmp_path_factory.mktemp("slots") / "data",
                           artim_timeout="2") as server:
        yield server


# --- C-STORE streamed to disk, max_instance_bytes ----------------------------------------

SIDE = 10_000  # 10 000 x 10 000 x 16 bits: a 200 MB instance


def _large_instance(path: Path) -> tuple[Path, str]:
    """A 200 MB CT slice written to ``path`` without holding it: header, then the pixel
    data element's header and its zero bytes."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4, Rows=SIDE, Columns=SIDE)
    del ds.PixelData
    length = SIDE * SIDE * 2
    chunk = bytes(1 << 24)
    with path.open("wb") as file:
        file.write(part10(ds) + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", length))
        for _ in range(length // len(chunk)):
            file.write(chunk)
        file.write(bytes(length % len(chunk)))
    return path, ds.StudyInstanceUID


def _same_after_meta(stored: Path, source: Path) -> bool:
    """The data sets are byte-identical (the File Meta differs: the source AE title)."""
    with stored.open("rb") as left, source.open("rb") as right:
        for file in (left, right):
            file.seek(dataset_offset(file.read(4096)))
        while (chunk := left.read(1 << 24)) == right.read(1 << 24):
            if not chunk:
                return True
    return False


def test_a_large_c_store_is_streamed_to_disk(gateway: PasserelleProcess,
                                             tmp_path: Path) -> None:
    source, study = _large_instance(tmp_path / "large.dcm")
    size = source.stat().st_size
    with PeakRss(gateway) as rss:
        assert send(gateway.dicom_port, source) == (0x0000, "")
    [stored] = _stored(gateway, study)
    print(f"RSS growth receiving {size / 1e6:.0f} MB: {rss.growth / 1e6:.1f} MB")
    assert rss.growth < size / 4, f"RSS grew by {rss.growth / 1e6:.0f} MB"
    assert _same_after_meta(stored, source)


def test_max_instance_bytes_bounds_c_store_as_it_arrives(tmp_path: Path) -> None:
    big = ct_slice(generate_uid(), generate_uid(), 1, 1, size=1024)  # 2 MB of pixels
    small = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    with PasserelleProcess(tmp_path / "data", max_instance_bytes="1000000") as server:
        assoc = associate(server.dicom_port, [big])
        assert assoc.is_established
        try:
            refused = assoc.send_c_store(big)
            assert refused.Status == 0xA700
            assert "max_instance_bytes" in refused.ErrorComment
            # The rest was read and dropped: the association goes on.
            assert assoc.send_c_store(small).Status == 0x0000
        finally:
            assoc.release()
        assert _stored(server, big.StudyInstanceUID) == []
        assert len(_stored(server, small.StudyInstanceUID)) == 1
        assert server.metric("passerelle_ingest_failures_total", protocol="dimse",
                             reason="too-large") == 1


def _deflated(path: Path, side: int) -> tuple[Path, str]:
    """A CT slice of ``side`` x ``side`` 16-bit zero pixels written to ``path`` in Deflated
    Explicit VR Little Endian (PS3.5 A.5), compressed as it is written (never held whole);
    and its study."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4, Rows=side, Columns=side)
    del ds.PixelData
    length = side * side * 2
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 24)
    with path.open("wb") as file:
        file.write(file_preamble_and_meta(ds.SOPClassUID, ds.SOPInstanceUID,
                                          DeflatedExplicitVRLittleEndian))
        file.write(deflater.compress(bytes(dataset_bytes(part10(ds))) + b"\xe0\x7f\x10\x00OW"
                                     + struct.pack("<HL", 0, length)))
        for _ in range(length // len(chunk)):
            file.write(deflater.compress(chunk))
        file.write(deflater.compress(bytes(length % len(chunk))) + deflater.flush())
    return path, ds.StudyInstanceUID


def _stow(server: PasserelleProcess, path: Path) -> httpx.Response:
    body = (b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes()
            + b"\r\n--b0undary--\r\n")
    return httpx.post(f"{server.base_url}/dicom-web/studies", content=body, timeout=60,
                      headers={"Content-Type": 'multipart/related; '
                               'type="application/dicom"; boundary=b0undary'})


def _failure_reasons(response: httpx.Response) -> list[int]:
    return [item["00081197"]["Value"][0] for item in response.json()["00081198"]["Value"]]


def test_a_deflate_bomb_is_refused_as_it_inflates(tmp_path: Path) -> None:
    path, study = _deflated(tmp_path / "bomb.dcm", 14_500)  # 420 MB inflated
    print(f"deflate bomb: {path.stat().st_size / 1e3:.0f} KB inflating to 420 MB")
    with PasserelleProcess(tmp_path / "data", max_instance_bytes=str(10 << 20)) as server:
        with PeakRss(server) as rss, _echo_latency(server) as echoes:
            started = time.monotonic()
            status, comment = send(server.dicom_port, path)
            refused_in = time.monotonic() - started
            response = _stow(server, path)
        print(f"C-STORE answered 0x{status:04X} in {refused_in:.2f} s; RSS growth "
              f"{rss.growth / 1e6:.1f} MB; slowest C-ECHO meanwhile {max(echoes):.2f} s")
        assert (status, "max_instance_bytes" in comment) == (0xA700, True)
        assert rss.growth < 50 << 20, f"RSS grew by {rss.growth / 1e6:.0f} MB"
        assert echoes and math.inf not in echoes
        assert response.status_code == 409
        assert _failure_reasons(response) == [0xA700]
        assert _stored(server, study) == []
        result = server.cli("import", "--quiet", str(path))
        assert result.returncode == 1
        assert f"{path}: too-large:" in result.stdout


def test_a_deflated_data_set_within_the_limits_is_inflated_as_a_stream(
        gateway: PasserelleProcess, tmp_path: Path) -> None:
    path, study = _deflated(tmp_path / "deflated.dcm", SIDE)  # 200 MB inflated
    with PeakRss(gateway) as rss:
        assert send(gateway.dicom_port, path) == (0x0000, "")
    print(f"deflated C-STORE of 200 MB inflated: RSS growth {rss.growth / 1e6:.1f} MB")
    assert rss.growth < 50 << 20, f"RSS grew by {rss.growth / 1e6:.0f} MB"
    [stored] = _stored(gateway, study)
    assert _same_after_meta(stored, path)


def _pdu(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value (PS3.8 9.3.5, E.2: ``control`` 01 a
    command fragment, 03 the last one, 02 the last data set fragment)."""
    value = bytes([context_id, control]) + fragment
    return (b"\x04\x00" + struct.pack(">L", len(value) + 4) + struct.pack(">L", len(value))
            + value)


def _command(**elements: object) -> bytes:
    """A DIMSE command set (implicit VR little endian, PS3.7 6.3.1) with its group length."""
    command = Dataset()
    for keyword, value in elements.items():
        setattr(command, keyword, value)
    body = encode(command, True, True)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def _context(assoc: Association, sop_class: str) -> int:
    [context] = [c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class]
    return context.context_id


def _ended(assoc: Association) -> None:
    """Wait for the server to end ``assoc`` (A-ABORT or a closed connection)."""
    wait_for(lambda: not assoc.is_established, 10, "the server to abort the association")
    assoc.abort()


def _echo(server: PasserelleProcess) -> float:
    """One C-ECHO over a fresh association from 127.0.0.1: how long it took; fails if
    refused."""
    started = time.monotonic()
    assoc = associate(server.dicom_port, timeout=10)
    assert assoc.is_established, "association refused"
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    return time.monotonic() - started


def _accepted(server: PasserelleProcess) -> bool:
    """True when an association from 127.0.0.1 is accepted (then released)."""
    assoc = associate(server.dicom_port, timeout=10)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def test_malformed_c_store_requests_abort_and_free_their_slots(
        gateway: PasserelleProcess) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    # A C-STORE-RQ without its Affected SOP Class UID (mandatory, PS3.7 9.3.1.1).
    command = _command(CommandField=0x0001, MessageID=1, Priority=0,
                       CommandDataSetType=0x0000, AffectedSOPInstanceUID=ds.SOPInstanceUID)
    for _ in range(20):  # more than max_associations (16) and the 8 of one client
        assoc = associate(gateway.dicom_port, [ds], timeout=10)
        assert assoc.is_established, "association refused: slots leaked"
        context = _context(assoc, ds.SOPClassUID)
        connection = assoc.dul.socket.socket
        connection.sendall(_pdu(context, 0x03, command) + _pdu(context, 0x02, b"\0" * 64))
        _ended(assoc)
    waited = _echo(gateway)
    print(f"C-ECHO answered in {waited:.2f} s after 20 malformed C-STORE-RQs")
    wait_for(lambda: gateway.metric("passerelle_dicom_associations_open") == 0, 10,
             "every connection to be counted as closed")
    assert "aborting the association with 127.0.0.1: a C-STORE-RQ without" in gateway.log()


def test_command_fragments_after_a_c_store_request_are_cut_off(
        gateway: PasserelleProcess) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    assoc = associate(gateway.dicom_port, [ds])
    assert assoc.is_established
    context = _context(assoc, ds.SOPClassUID)
    command = _command(CommandField=0x0001, MessageID=1, Priority=0,
                       CommandDataSetType=0x0000, AffectedSOPClassUID=ds.SOPClassUID,
                       AffectedSOPInstanceUID=ds.SOPInstanceUID)
    fragment = _pdu(context, 0x01, bytes(200_000))
    connection = assoc.dul.socket.socket
    with PeakRss(gateway) as rss, contextlib.suppress(OSError):  # aborted while sending
        connection.sendall(_pdu(context, 0x03, command))
        for _ in range(100):  # 20 MB of command fragments after the last one
            connection.sendall(fragment)
    print(f"RSS growth under 20 MB of command fragments: {rss.growth / 1e6:.1f} MB")
    _ended(assoc)
    assert rss.growth < 5 << 20, f"RSS grew by {rss.growth / 1e6:.0f} MB"
    _echo(gateway)


def test_pipelined_c_stores_are_all_stored(gateway: PasserelleProcess) -> None:
    study = generate_uid()
    instances = [ct_slice(study, generate_uid(), 1, n, size=256) for n in range(1, 6)]
    assoc = associate(gateway.dicom_port, instances[:1])
    assert assoc.is_established
    try:
        # Keep the requestor's reactor off its DIMSE queue, as its send_c_store does.
        assoc._reactor_checkpoint.clear()
        wait_for(lambda: assoc._is_paused, 5, "the requestor's reactor to pause")
        pdus = [pdu for n, ds in enumerate(instances, 1) for pdu in c_store_pdus(assoc, ds, n)]
        assoc.dul.socket.socket.sendall(b"".join(pdus))  # all five before any answer
        answers = {}
        for _ in instances:
            _, response = assoc.dimse.get_msg(block=True)
            assert response is not None, "a C-STORE-RSP missing"
            answers[response.MessageIDBeingRespondedTo] = response.Status
        assoc._reactor_checkpoint.set()
    finally:
        assoc.release()
    assert answers == dict.fromkeys(range(1, 6), 0x0000)
    assert len(_stored(gateway, study)) == 5


def test_an_interrupted_c_store_leaves_no_temporary_file(gateway: PasserelleProcess) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=1024)  # 2 MB of pixels
    tmp = gateway.data_dir / "tmp"
    assoc = associate(gateway.dicom_port, [ds])
    assert assoc.is_established
    try:
        connection = assoc.dul.socket.socket
        pdus = c_store_pdus(assoc, ds)
        for pdu in pdus[:-1]:  # all but the last fragment
            connection.sendall(pdu)
        wait_for(lambda: any(f.stat().st_size > 1 << 20 for f in tmp.iterdir()), 10,
                 "the data set to be written to disk as it arrives")
        connection.shutdown(socket.SHUT_RDWR)  # the peer goes away mid-C-STORE
        wait_for(lambda: not list(tmp.iterdir()), 10, "the temporary file to be deleted")
    finally:
        assoc.abort()
    assert _stored(gateway, ds.StudyInstanceUID) == []


def test_the_ingest_budget_bounds_c_store_and_is_given_back(tmp_path: Path) -> None:
    """C-STORE counts in ingest_bytes_in_flight (1.5 MB here) as its data set arrives: a
    2 MB data set is refused with 0xA700 (Out of Resources) and its rest dropped, five in a
    row; three C-STOREs cut off mid-data-set give their bytes back. The budget then reads 0,
    no temporary file is left and a data set that fits is stored."""
    with PasserelleProcess(tmp_path / "data", ingest_bytes_in_flight="1500000") as server:
        in_flight = functools.partial(server.metric, "passerelle_budget_bytes_in_use",
                                      budget="ingest_bytes")
        big = [ct_slice(generate_uid(), generate_uid(), 1, 1, size=1024) for _ in range(5)]
        assoc = associate(server.dicom_port, big[:1])
        assert assoc.is_established
        try:
            for ds in big:
                refused = assoc.send_c_store(ds)
                assert refused.Status == 0xA700
                assert "ingest_bytes" in refused.ErrorComment
        finally:
            assoc.release()
        tmp = server.data_dir / "tmp"
        for _ in range(3):
            ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=600)  # 720 KB
            assoc = associate(server.dicom_port, [ds])
            assert assoc.is_established
            try:
                connection = assoc.dul.socket.socket
                for pdu in c_store_pdus(assoc, ds)[:-1]:
                    connection.sendall(pdu)
                wait_for(lambda: in_flight() > 500_000, 10, "the data set to be in flight")
                connection.shutdown(socket.SHUT_RDWR)
            finally:
                assoc.abort()
            wait_for(lambda: in_flight() == 0, 10, "the reservation to be given back")
        assert not list(tmp.iterdir())
        assert server.metric("passerelle_budget_refusals_total", reason="ingest_bytes") == 5
        fits = ct_slice(generate_uid(), generate_uid(), 1, 1, size=600)
        assert send(server.dicom_port, fits) == (0x0000, "")
        assert in_flight() == 0
        print(f"C-ECHO after: {_echo(server):.3f} s")
        assert [_stored(server, ds.StudyInstanceUID) for ds in big] == [[]] * 5


def test_an_endless_dimse_command_is_cut_off(gateway: PasserelleProcess) -> None:
    assoc = associate(gateway.dicom_port)
    assert assoc.is_established
    context = assoc.accepted_contexts[0].context_id
    # Command fragments that are never the last one (PS3.8 E.2: control header 01).
    value = bytes([context, 0x01]) + bytes(200_000)
    pdu = b"\x04\x00" + struct.pack(">L", len(value) + 4) + struct.pack(">L", len(value)) + value
    connection = assoc.dul.socket.socket
    with PeakRss(gateway) as rss, contextlib.suppress(OSError):  # aborted while sending
        for _ in range(50):  # 10 MB
            connection.sendall(pdu)
    wait_for(lambda: assoc.is_aborted, 10, "the server to abort the association")
    assert rss.growth < 5 << 20, f"RSS grew by {rss.growth / 1e6:.0f} MB"


# --- The structure of a data set ------------------------------------------------------------

@contextlib.contextmanager
def _echo_latency(server: PasserelleProcess) -> Iterator[list[float]]:
    """C-ECHOs over fresh associations, one after the other in a thread: their durations
    (infinite for one that failed)."""
    durations: list[float] = []
    done = threading.Event()

    def echo() -> None:
        while not done.is_set():
            started = time.monotonic()
            assoc = associate(server.dicom_port, timeout=10)
            answered = assoc.is_established and assoc.send_c_echo().Status == 0x0000
            assoc.release()
            durations.append(time.monotonic() - started if answered else math.inf)

    thread = threading.Thread(target=echo)
    thread.start()
    try:
        yield durations
    finally:
        done.set()
        thread.join()


def test_a_sequence_of_200001_items_is_refused_before_it_is_parsed(gateway: PasserelleProcess,
                                                       tmp_path: Path) -> None:
    server = gateway
    path, study = _instance_with(tmp_path, _sequence((ITEM + _reference() + ITEM_END) * 200_001))
    failures = server.metric("passerelle_ingest_failures_total", protocol="dimse",
                             reason="too-complex")
    with PeakRss(server) as rss, _echo_latency(server) as echoes:
        started = time.monotonic()
        status, comment = send(server.dicom_port, path)
        refused_in = time.monotonic() - started
        time.sleep(0.5)  # an echo after the refusal too
    print(f"answered 0x{status:04X} in {refused_in:.2f} s, slowest echo {max(echoes):.2f} s,"
          f" RSS growth {rss.growth / 1e6:.1f} MB")
    assert (status, "max_sequence_items" in comment) == (0xA900, True)
    assert rss.growth < 100 << 20, f"RSS grew by {rss.growth / 1e6:.0f} MB"
    assert echoes and math.inf not in echoes
    assert _stored(server, study) == []
    assert server.metric("passerelle_ingest_failures_total", protocol="dimse",
                         reason="too-complex") == failures + 1
    # STOW-RS takes the same path.
    response = _stow(server, path)
    assert response.status_code == 409
    assert _failure_reasons(response) == [0xA900]
    assert _stored(server, study) == []


def test_nesting_and_elements_are_bounded(tmp_path: Path) -> None:
    deep, deep_study = _instance_with(tmp_path, _nested(9))
    five = b"".join(_reference(0x1150 + n) for n in range(5))
    wide, wide_study = _instance_with(tmp_path, _sequence((ITEM + five + ITEM_END) * 1_000))
    within, within_study = _instance_with(tmp_path, _nested(8))
    with PasserelleProcess(tmp_path / "data", max_sequence_depth="8",
                           max_dataset_elements="5000") as server:
        status, comment = send(server.dicom_port, deep)
        assert (status, "max_sequence_depth" in comment) == (0xA900, True)
        status, comment = send(server.dicom_port, wide)
        assert (status, "max_dataset_elements" in comment) == (0xA900, True)
        assert _stored(server, deep_study) == _stored(server, wide_study) == []
        assert send(server.dicom_port, within) == (0x0000, "")
        assert len(_stored(server, within_study)) == 1


def test_passerelle_import_applies_the_same_limits(tmp_path: Path) -> None:
    deep, _ = _instance_with(tmp_path, _nested(9))
    big = tmp_path / "big.dcm"
    ct_slice(generate_uid(), generate_uid(), 1, 1, size=1024).save_as(
        big, enforce_file_format=True)  # 2 MB
    server = PasserelleProcess(tmp_path / "data", max_instance_bytes="1000000",
                               max_sequence_depth="8")
    result = server.cli("import", "--quiet", str(deep), str(big))
    assert result.returncode == 1, result.stdout
    assert f"{deep}: too-complex: sequences nested over 8" in result.stdout
    assert f"{big}: too-large:" in result.stdout


# --- Association slots ----------------------------------------------------------------------

def _connect_from(address: str, port: int) -> socket.socket:
    """A TCP connection to the DICOM port from ``address`` (any of 127.0.0.0/8 on Linux)."""
    return socket.create_connection(("127.0.0.1", port), timeout=5,
                                    source_address=(address, 0))


def _flood(port: int, count: int = 16) -> list[socket.socket]:
    """``count`` silent connections, alternately from 127.0.0.2 and 127.0.0.3 (8 each:
    the default limit per client)."""
    return [_connect_from(f"127.0.0.{2 + n % 2}", port) for n in range(count)]


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_closed_connections_free_their_slots_at_once(gateway: PasserelleProcess) -> None:
    for _ in range(3):  # and again: nothing accumulates
        for sock in _flood(gateway.dicom_port):
            sock.close()
        waited = _echo(gateway)
        print(f"C-ECHO answered in {waited:.2f} s right after the flood closed")
    wait_for(lambda: gateway.metric("passerelle_dicom_associations_open") == 0, 10,
             "every connection to be counted as closed")


def test_silent_connections_from_two_addresses_leave_room_for_others(
        gateway: PasserelleProcess) -> None:
    flood = _flood(gateway.dicom_port)
    try:
        started = time.monotonic()
        waited = _echo(gateway)
        print(f"C-ECHO answered in {waited:.2f} s into a flood of 16 silent connections")
        # Each silent connection is closed by the server once ARTIM (2 s) expires.
        assert all(_closed_by_server(sock, within=15) for sock in flood)
        print(f"the silent connections closed {time.monotonic() - started:.2f} s in "
              "(artim_timeout 2 s)")
    finally:
        for sock in flood:
            sock.close()


def test_a_trickled_association_request_is_cut_off_at_artim(
        gateway: PasserelleProcess) -> None:
    with _connect_from("127.0.0.2", gateway.dicom_port) as sock:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 1000))  # A-ASSOCIATE-RQ of 1000 bytes
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # A byte every half second; 60 s is the liveness bound, for a 2 s ARTIM.
            while not _closed_by_server(sock, within=0.5):
                sock.sendall(b"\x00")
                assert time.monotonic() - started < 60, "never cut off"
        print(f"cut off after {time.monotonic() - started:.2f} s (artim_timeout 2 s)")


def test_connections_past_max_pending_are_closed_at_once(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", max_pending_connections="4") as server:
        flood = _flood(server.dicom_port, 4)
        try:
            # Each receiver process accepts from the one socket: the surplus must come once
            # the four hold their slots, not race one of them for the last.
            wait_for(lambda: server.metric("passerelle_dicom_associations_open") == 4, 10,
                     "the four connections to be taken in")
            with _connect_from("127.0.0.4", server.dicom_port) as surplus:
                assert _closed_by_server(surplus, within=10)
        finally:
            for sock in flood:
                sock.close()
        # Their slots are freed as the server sees each close: a moment after the client's.
        wait_for(lambda: _accepted(server), 10, "an association to be accepted again")


def test_one_address_over_its_limit_cannot_fill_max_pending(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", max_pending_connections="4",
                           max_associations_per_client="2", artim_timeout="10") as server:
        # Two silent connections within 127.0.0.2's limit, ten over it: those wait (up to
        # ARTIM) for an A-ASSOCIATE-RQ to answer with A-ASSOCIATE-RJ, holding no slot.
        flood = [_connect_from("127.0.0.2", server.dicom_port) for _ in range(12)]
        try:
            wait_for(lambda: server.metric("passerelle_dicom_associations_total",
                                           outcome="refused-over-limit") == 10, 10,
                     "the ten connections over the limit to be seen")
            waited = _echo(server)
            print(f"C-ECHO from 127.0.0.1 answered in {waited:.2f} s with 127.0.0.2 holding "
                  "12 connections (limit 2 per client, max_pending_connections 4)")
        finally:
            for sock in flood:
                sock.close()
