"""Hostile input against the running service: garbage and malformed PDUs, idle and surplus
associations, absurd data sets, path traversal, malformed multipart, huge headers, SQL and
LIKE metacharacters, includefield abuse, deep JSON, a client hogging HTTP workers.

Every attack gets a clean refusal, and afterwards the service still answers others with
bounded memory (checked at the end of the module)."""

import contextlib
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid
from pynetdicom import Association

from tests.processes import PasserelleProcess, wait_for
from tests.scu import associate, send
from tests.synthetic import ct_slice, part10

PER_CLIENT = 3
HTTP_PER_CLIENT = 4
HTTP_CONNECTIONS_PER_CLIENT = 12
HEAD_TIMEOUT = 2
MAX_RSS = 400 << 20  # the service at rest is ~120 MiB


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory,
           ct_study: list[Path]) -> Iterator[PasserelleProcess]:
    data = tmp_path_factory.mktemp("hostile") / "data"
    with PasserelleProcess(data, network_timeout="3", acse_timeout="3", dimse_timeout="5",
                           max_associations_per_client=str(PER_CLIENT),
                           http_max_requests_per_client=str(HTTP_PER_CLIENT),
                           http_max_connections_per_client=str(HTTP_CONNECTIONS_PER_CLIENT),
                           http_head_timeout_seconds=str(HEAD_TIMEOUT),
                           max_instance_bytes="1000000",
                           # The per-client limits hold over every HTTP worker together.
                           http_workers="2") as server:
        for path in ct_study:
            assert send(server.dicom_port, path)[0] == 0x0000
        yield server
        _still_serving(server)


def _still_serving(server: PasserelleProcess) -> None:
    """C-ECHO and HTTP answer, and the process's memory stayed bounded."""
    assoc = associate(server.dicom_port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert server.largest_rss() < MAX_RSS
    assert "Exception in ASGI application" not in server.log()  # no HTTP 500 at all
    assert "Fatal error: protocol" not in server.log()  # no HTTP connection handler crashed


def _study(server: PasserelleProcess) -> dict:
    return httpx.get(f"{server.base_url}/dicom-web/studies").json()[0]


def _closed_by_server(sock: socket.socket, within: float = 15) -> bool:
    """Read until the server closes the connection (True) or ``within`` seconds pass."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def _raw(server: PasserelleProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10)


# --- DICOM port -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_on_the_dicom_port(target: PasserelleProcess, seed: int) -> None:
    rng = random.Random(seed)
    garbage = rng.randbytes(rng.randint(1, 65536))
    if seed % 2:  # a plausible PDU type in front, so the garbage reaches the PDU decoder
        garbage = bytes([rng.randint(1, 7), 0]) + struct.pack(">L", len(garbage)) + garbage
    with _raw(target) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(garbage)  # may be cut short by the server: fine
        assert _closed_by_server(sock)
    assert echo(target)


def test_truncated_pdu(target: PasserelleProcess) -> None:
    with _raw(target) as sock:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 4096) + b"\x00\x01" + b"x" * 8)
        sock.shutdown(socket.SHUT_WR)  # and nothing more
        assert _closed_by_server(sock)
    assert echo(target)


def test_oversized_pdu_is_refused_at_its_header(target: PasserelleProcess) -> None:
    rss_before = target.rss()
    with _raw(target) as sock:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0))
        sent = 0
        try:
            for _ in range(64):  # up to 64 MiB if the server kept reading
                sock.sendall(b"\x00" * (1 << 20))
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 64, "the server kept reading a PDU announced as 4 GiB"
        assert _closed_by_server(sock)
    assert target.rss() - rss_before < 32 << 20
    assert "PDU of 4294967280 bytes announced" in target.log()
    assert echo(target)


def test_silent_connection_and_idle_association_are_closed(target: PasserelleProcess) -> None:
    with _raw(target) as silent:
        idle = associate(target.dicom_port, timeout=60)
        assert idle.is_established
        # Nothing is sent on either; both are closed after the configured timeouts (3 s).
        assert _closed_by_server(silent, within=20)
        wait_for(lambda: not idle.is_alive(), 20, "the idle association to be closed")
    assert idle.is_aborted or idle.is_released
    assert echo(target)


@contextlib.contextmanager
def _every_association_allowed(server: PasserelleProcess) -> Iterator[list[Association]]:
    """The test client's PER_CLIENT associations, held open, released at the end."""
    wait_for(lambda: server.metric("passerelle_dicom_associations_open") == 0, 10,
             "the connections of earlier tests to close")  # they count against the limit
    held = [associate(server.dicom_port) for _ in range(PER_CLIENT)]
    try:
        yield held
    finally:
        for assoc in held:
            assoc.release()


def test_associations_over_the_per_client_limit_are_rejected(
        target: PasserelleProcess) -> None:
    with _every_association_allowed(target) as held:
        assert all(assoc.is_established for assoc in held)
        surplus = associate(target.dicom_port)
        assert surplus.is_rejected
        rejection = surplus.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        assert target.metric("passerelle_dicom_associations_total",
                             outcome="refused-over-limit") >= 1
    wait_for(lambda: target.metric("passerelle_dicom_associations_open") == 0, 10,
             "the held associations to close")
    assert echo(target)


def test_a_client_over_its_limit_trickling_its_request_is_cut_off(
        target: PasserelleProcess) -> None:
    with _every_association_allowed(target), _raw(target) as sock:
        # An A-ASSOCIATE-RQ of 1000 bytes, sent a byte a second.
        sock.sendall(b"\x01\x00" + struct.pack(">L", 1000))
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - started < 30:
                sock.sendall(b"\x00")
                if _closed_by_server(sock, within=1):
                    break
        assert time.monotonic() - started < 15, "the rejection has no overall deadline"


@pytest.mark.parametrize("length", [0xFFFFFFF0, 0x7FFFFFFF, 100_000_000])
def test_data_set_with_an_absurd_length(target: PasserelleProcess, tmp_path: Path,
                                        length: int) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    data = bytearray(part10(ds))
    # Explicit VR LE: (0010,0010) PN, 2-byte length: make it a UN with a 4-byte length.
    at = data.index(b"\x10\x00\x10\x00PN")
    old_length = struct.unpack("<H", data[at + 6:at + 8])[0]
    data[at:at + 8 + old_length] = b"\x10\x00\x10\x00UN\x00\x00" + struct.pack("<L", length)
    path = tmp_path / "absurd.dcm"
    path.write_bytes(bytes(data))
    status, comment = send(target.dicom_port, path)
    assert status in (0xC000, 0xA900), (hex(status), comment)
    assert not list(target.data_dir.glob(f"studies/{ds.StudyInstanceUID}"))


def test_deeply_nested_sequences(target: PasserelleProcess, tmp_path: Path) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    data = bytearray(part10(ds))
    # 40 000 nested undefined-length sequence items (800 KB: under max_instance_bytes),
    # inserted after the file meta.
    item = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    at = data.index(b"\x08\x00\x16\x00")  # SOP Class UID, first data set element
    path = tmp_path / "deep.dcm"
    path.write_bytes(bytes(data[:at]) + item * 40_000 + bytes(data[at:]))
    status, _ = send(target.dicom_port, path)
    assert status in (0xC000, 0xA900), hex(status)
    assert echo(target)


def echo(server: PasserelleProcess) -> bool:
    """A fresh association answers C-ECHO."""
    assoc = associate(server.dicom_port)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


# --- HTTP -----------------------------------------------------------------------------

TRAVERSALS = [
    "/dicom-web/studies/..%2F..%2F..%2Fetc%2Fpasswd",
    "/dicom-web/studies/%2Fetc%2Fpasswd/metadata",
    "/dicom-web/studies/1.2.3%00/metadata",
    "/dicom-web/studies/1.2.3/series/..%2F..%2Findex.sqlite",
    "/dicom-web/studies/1.2.3/series/4.5/instances/..%5C..%5Cserve.lock",
    "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/bulkdata/..%2F..",
    "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1%00",
    "/wado?requestType=WADO&studyUID=../..&seriesUID=%2Fetc&objectUID=passwd"
    "&contentType=application/dicom",
    "/wado?requestType=WADO&studyUID=1.2%00&seriesUID=1.2&objectUID=1.2",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_uids(target: PasserelleProcess, path: str) -> None:
    response = httpx.get(target.base_url + path)
    assert response.status_code in (400, 404), response.text
    assert "root:" not in response.text and "SQLite" not in response.text
    assert "Traceback" not in response.text


STOW = "multipart/related; type=\"application/dicom\"; boundary=XyZ"
BAD_BODIES = {
    "no boundary parameter": ('multipart/related; type="application/dicom"', b"--XyZ\r\n", 415),
    "no boundary in the body": (STOW, b"just some bytes, no delimiter at all", 400),
    "unterminated part": (STOW, b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nDICM", 400),
    "headers never end": (STOW, b"--XyZ\r\n" + b"X-Junk: y\r\n" * 5000, 400),
    "part over the limit": (STOW, b"--XyZ\r\n\r\n" + b"x" * 1_100_000 + b"\r\n--XyZ--", 413),
    "not multipart": ("application/json", b"{}", 415),
    "garbage content type": ("\x01;;;===", b"", 415),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_malformed_multipart_bodies(target: PasserelleProcess, case: str) -> None:
    content_type, body, status = BAD_BODIES[case]
    response = httpx.post(f"{target.base_url}/dicom-web/studies", content=body,
                          headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.text and "Traceback" not in response.text


def test_huge_accept_headers(target: PasserelleProcess) -> None:
    study = _study(target)["0020000D"]["Value"][0]
    url = f"{target.base_url}/dicom-web/studies/{study}"
    huge = ", ".join(["application/dicom"] * 5500)  # ~100 KB
    # Refused by the HTTP parser (16 KB of headers at most), maybe before we finish sending.
    with contextlib.suppress(httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        assert httpx.get(url, headers={"Accept": huge}).status_code in (400, 431)
    many = ", ".join(f"image/x-{n}; q=0.{n % 10}" for n in range(900))  # 16 KB, 900 ranges
    started = time.monotonic()
    assert httpx.get(url, headers={"Accept": many}).status_code in (400, 406)
    assert time.monotonic() - started < 5
    assert httpx.get(url, headers={"Accept": "application/dicom; q=x"}).status_code == 400
    assert httpx.get(url, headers={"Accept": "no-slash"}).status_code == 400


SQL = ["' OR '1'='1", "x'; DROP TABLE patients; --", "\" OR 1=1 --", "%", "_A%",
       "PAT001' --", "*' UNION SELECT sql FROM sqlite_master --", "\\", "[a-z]*"]


@pytest.mark.parametrize("value", SQL)
def test_sql_and_like_metacharacters_in_queries(target: PasserelleProcess, value: str) -> None:
    for key in ("PatientID", "PatientName", "AccessionNumber", "StudyDescription"):
        response = httpx.get(f"{target.base_url}/dicom-web/studies", params={key: value})
        assert response.status_code in (200, 400), response.text
        if response.status_code == 200:
            assert response.json() == [], f"{key}={value!r} matched"
    response = httpx.get(f"{target.base_url}/dicom-web/studies",
                         params={"StudyDate": value})
    assert response.status_code == 400
    assert len(httpx.get(f"{target.base_url}/dicom-web/studies").json()) == 1  # still there


def test_includefield_abuse(target: PasserelleProcess) -> None:
    url = f"{target.base_url}/dicom-web/studies"
    repeated = "&".join(["includefield=PatientAge"] * 2000)
    assert httpx.get(f"{url}?{repeated}").status_code == 400
    listed = ",".join(["00100010"] * 2000)
    assert httpx.get(url, params={"includefield": listed}).status_code == 400
    assert httpx.get(url, params={"includefield": "NoSuchKeyword"}).status_code == 400
    assert httpx.get(url, params={"includefield": "all"}).status_code == 200
    assert httpx.get(url, params={"limit": "99999999999999999999"}).status_code == 400
    assert httpx.get(url, params={"offset": "-1"}).status_code == 400


def test_deep_and_large_json(target: PasserelleProcess) -> None:
    study = _study(target)["0020000D"]["Value"][0]
    url = f"{target.base_url}/admin/studies/{study}/confidentiality"
    deep = httpx.post(url, content=b"[" * 60_000 + b"]" * 60_000)
    assert deep.status_code == 413  # refused on size, before parsing
    nested = httpx.post(url, content=b"[" * 30_000 + b"]" * 30_000)
    assert nested.status_code == 400, nested.text
    assert httpx.post(url, content=b'{"level": ' * 5000).status_code == 400
    assert httpx.post(url, content=b"\xff\xfe garbage").status_code == 400


def test_one_client_cannot_take_every_worker(target: PasserelleProcess) -> None:
    """Requests whose bodies never come hold their slot; past the limit a client gets 429
    and everything else still works."""
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW}\r\n"
            "Content-Length: 100000\r\n\r\n--XyZ\r\n").encode()
    stalled = [socket.create_connection(("127.0.0.1", target.http_port))
               for _ in range(HTTP_PER_CLIENT)]
    try:
        for sock in stalled:
            sock.sendall(head)
        wait_for(lambda: httpx.get(f"{target.base_url}/dicom-web/studies").status_code == 429,
                 10, "the per-client limit to apply")
        refused = httpx.get(f"{target.base_url}/dicom-web/studies")
        assert refused.headers["Retry-After"] == "1"
        assert httpx.get(f"{target.base_url}/health").status_code == 200
        assert target.metric("passerelle_http_refused_over_limit_total") >= 1
    finally:
        for sock in stalled:
            sock.close()
    wait_for(lambda: httpx.get(f"{target.base_url}/dicom-web/studies").status_code == 200,
             10, "the slots to be released")


def test_a_request_head_sent_byte_by_byte_is_cut_off(target: PasserelleProcess) -> None:
    """Slowloris: a byte every half second keeps uvicorn's keep-alive timer from firing, but
    not the head deadline; meanwhile others are served."""
    head = b"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    slow = socket.create_connection(("127.0.0.1", target.http_port))
    started = time.monotonic()
    try:
        slow.settimeout(0.5)
        closed = False
        for byte in head:
            try:
                slow.sendall(bytes([byte]))
                closed = slow.recv(1) == b""
            except TimeoutError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                closed = True
            if closed or time.monotonic() - started > 30:
                break
            assert httpx.get(f"{target.base_url}/health").status_code == 200
        assert closed, "the slow connection was still open after 30 s"
        assert HEAD_TIMEOUT <= time.monotonic() - started < HEAD_TIMEOUT + 10
    finally:
        slow.close()
    assert target.metric("passerelle_http_connections_closed_total",
                         reason="head_timeout") >= 1


def test_connections_over_the_per_client_limit_are_refused(target: PasserelleProcess) -> None:
    """Idle connections count until the head deadline closes them."""
    held = [socket.create_connection(("127.0.0.1", target.http_port))
            for _ in range(HTTP_CONNECTIONS_PER_CLIENT)]
    try:
        wait_for(lambda: httpx.get(f"{target.base_url}/health").status_code == 429, 5,
                 "the connection limit to apply")
        refused = httpx.get(f"{target.base_url}/dicom-web/studies")
        assert refused.status_code == 429
        assert refused.text == "too many connections from this address\n"
        assert all(_closed_by_server(sock, HEAD_TIMEOUT + 10) for sock in held)
    finally:
        for sock in held:
            sock.close()
    assert httpx.get(f"{target.base_url}/dicom-web/studies").status_code == 200
    assert target.metric("passerelle_http_connections_closed_total",
                         reason="per_client_limit") >= 1
