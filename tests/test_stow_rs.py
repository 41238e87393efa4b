"""STOW-RS (PS3.18 10.5): dicomweb-client against a running service over a socket, and the
validation of bodies and parts in-process (raw HTTP on the application)."""

import errno
import hashlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from storage.blobs import TemporaryBlob
from tests.inprocess import InProcessService
from tests.processes import PasserelleProcess
from tests.synthetic import ct_slice


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(parts: list[bytes], boundary: str = "b0undary") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + part + b"\r\n" for part in parts)
    return body + b"--" + boundary.encode() + b"--\r\n"


def post(service: InProcessService, path: str, body: bytes,
         content_type: str = 'multipart/related; type="application/dicom"; boundary=b0undary'
         ) -> httpx.Response:
    return service.post(f"/dicom-web{path}", content=body,
                        headers={"Content-Type": content_type})


def test_store_then_retrieve_with_dicomweb_client(server: PasserelleProcess) -> None:
    """End to end: dicomweb-client over a socket."""
    client = DICOMwebClient(url=f"{server.base_url}/dicom-web")
    study, series = generate_uid(), generate_uid()
    datasets = [ct_slice(study, series, 1, n, size=8) for n in (1, 2, 3)]
    response = client.store_instances(datasets)
    referenced = response.ReferencedSOPSequence
    assert sorted(item.ReferencedSOPInstanceUID for item in referenced) == sorted(
        ds.SOPInstanceUID for ds in datasets)
    assert response.RetrieveURL == f"{server.base_url}/dicom-web/studies/{study}"
    assert "FailedSOPSequence" not in response
    retrieved = client.retrieve_series(study, series)
    assert sorted(ds.SOPInstanceUID for ds in retrieved) == sorted(
        ds.SOPInstanceUID for ds in datasets)
    text = httpx.get(f"{server.base_url}/metrics").text
    assert 'passerelle_instances_received_total{protocol="stow"} 3.0' in text
    # Storing again: duplicates are a success.
    assert len(client.store_instances(datasets).ReferencedSOPSequence) == 3


def test_study_in_url_must_match(web: InProcessService) -> None:
    study = generate_uid()
    good = ct_slice(study, generate_uid(), 1, 1, size=8)
    other = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    response = post(web, f"/studies/{study}", multipart([part10(good), part10(other)]))
    assert response.status_code == 202
    body = response.json()
    [failed] = body["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [other.SOPInstanceUID]
    assert failed["00081197"]["Value"] == [0xA900]
    [stored] = body["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [good.SOPInstanceUID]
    assert not list((web.data_dir / "studies").glob(f"{other.StudyInstanceUID}*"))


def test_nothing_stored_is_a_conflict(web: InProcessService) -> None:
    bad = ct_slice(generate_uid(), "1.2.3/../../x", 1, 1, size=8)
    response = post(web, "/studies", multipart([part10(bad), b"not dicom at all"]))
    assert response.status_code == 409
    reasons = [item["00081197"]["Value"][0] for item in response.json()["00081198"]["Value"]]
    assert reasons == [0xA900, 0xC000]
    assert list((web.data_dir / "studies").rglob("*.dcm")) == []


@pytest.mark.parametrize("content_type, body, status, message", [
    ("application/dicom", b"x", 415, "multipart/related"),
    ('multipart/related; type="application/dicom+json"; boundary=b0undary', b"", 415,
     "multipart/related"),
    ('multipart/related; type="application/dicom"', b"", 415, "boundary"),
    ("not a media type", b"", 415, "multipart/related"),
    ('multipart/related; type="application/dicom"; boundary=b0undary', b"no boundary here",
     400, "malformed multipart body"),
    ('multipart/related; type="application/dicom"; boundary=b0undary',
     b"--b0undary\r\nContent-Type: application/dicom\r\n\r\ncut", 400, "malformed"),
    ('multipart/related; type="application/dicom"; boundary=b0undary', b"--b0undary--\r\n",
     400, "no instance"),
])
def test_bad_requests(web: InProcessService, content_type: str, body: bytes, status: int,
                      message: str) -> None:
    response = post(web, "/studies", body, content_type)
    assert response.status_code == status
    assert message in response.text
    assert web.get("/health").status_code == 200


def test_large_part_over_the_limit_is_refused(make_web: Callable[..., InProcessService]) -> None:
    web = make_web(max_instance_bytes="100000")
    big = ct_slice(generate_uid(), generate_uid(), 1, 1, size=512)  # 512 KB
    response = post(web, "/studies", multipart([part10(big)]))
    assert response.status_code == 413  # Content Too Large
    assert "100000 bytes" in response.text
    small = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    assert post(web, "/studies", multipart([part10(small)])).status_code == 200
    assert dcmread(next((web.data_dir / "studies").rglob("*.dcm"))).Rows == 8


def test_a_part_over_the_ingest_budget_is_refused_while_read(
        make_web: Callable[..., InProcessService]) -> None:
    web = make_web(ingest_bytes_in_flight="400000")  # its bytes count as they are spooled
    big = ct_slice(generate_uid(), generate_uid(), 1, 1, size=512)  # 512 KB
    response = post(web, "/studies", multipart([part10(big)]))
    assert response.status_code == 413
    assert "ingest_bytes_in_flight" in response.text
    assert not list((web.data_dir / "studies").rglob("*.dcm"))
    small = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    assert post(web, "/studies", multipart([part10(small)])).status_code == 200
    assert web.services.budget.ingest.in_use == 0  # every reservation given back


def test_parts_past_the_limit_end_the_request(make_web: Callable[..., InProcessService]) -> None:
    web = make_web(max_parts_per_request="2")
    slices = [part10(ct_slice(generate_uid(), generate_uid(), 1, n, size=8)) for n in (1, 2, 3)]
    response = post(web, "/studies", multipart(slices))
    assert response.status_code == 202  # the first two are stored, the third is not
    body = response.json()
    assert len(body["00081199"]["Value"]) == 2
    assert len(body["00081198"]["Value"]) == 1
    refused = post(web, "/studies", multipart([b"x"] * 3))
    assert refused.status_code == 413 and "max_parts_per_request" in refused.text


SIDE = 6000  # 6000 x 6000 x 16 bits: a 72 MB part


def _large_part() -> Iterator[bytes]:
    """A 72 MB Part 10 CT slice, a MiB at a time (never whole in this process either)."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4, Rows=SIDE, Columns=SIDE)
    del ds.PixelData
    length = SIDE * SIDE * 2
    yield part10(ds) + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", length)
    pattern = bytes(range(256)) * 4096  # 1 MiB
    for offset in range(0, length, len(pattern)):
        yield pattern[:length - offset]


def test_a_part_is_spooled_to_disk_never_held_in_memory(tmp_path: Path) -> None:
    """Issue 14, findings 5 and 6: a 72 MB part, more than twice the decode memory, goes to
    disk as it arrives: the service's RSS grows by a few MiB, not by the part, and the part
    is stored byte for byte."""
    digest = hashlib.sha256()
    boundary = "b0undary"

    def body() -> Iterator[bytes]:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        for chunk in _large_part():
            digest.update(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    with PasserelleProcess(tmp_path / "data", decode_memory_bytes=str(32 << 20),
                           ingest_bytes_in_flight=str(80 << 20)) as server:
        assert server.proc is not None
        before = peak = server.rss()
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            with ThreadPoolExecutor(1) as pool:
                posted = pool.submit(client.post, "/dicom-web/studies", content=body(),
                                     headers={"Content-Type": 'multipart/related; type='
                                              f'"application/dicom"; boundary={boundary}'})
                while not posted.done():
                    peak = max(peak, server.rss())
                    time.sleep(0.02)
            response = posted.result()
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            print(f"\nSTOW-RS of a {SIDE * SIDE * 2 / 1e6:.0f} MB part: RSS {before >> 20} MiB"
                  f" before, peak +{(peak - before) / (1 << 20):.1f} MiB; /health after it "
                  f"{time.monotonic() - started:.3f} s")
        assert response.status_code == 200, response.text
        assert server.metric("passerelle_budget_bytes_in_use", budget="ingest_bytes") == 0
        [stored] = (server.data_dir / "studies").rglob("*.dcm")
    with stored.open("rb") as file:
        assert hashlib.file_digest(file, "sha256").digest() == digest.digest()
    assert peak - before < 24 << 20, f"RSS grew by {(peak - before) >> 20} MiB"


def test_a_disk_full_while_spooling_fails_the_part_not_the_request(
        web: InProcessService, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC midway through writing a part to disk: that part fails with 0xA700 (Out of
    Resources), its rest is read and dropped, the next part is stored, no temporary file is
    left."""
    study = generate_uid()
    first, second = (ct_slice(study, generate_uid(), 1, n, size=256) for n in (1, 2))
    write = TemporaryBlob.write
    calls = 0

    def full_once(blob: TemporaryBlob, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second write of the first part (128 KB: written in pieces)
            raise OSError(errno.ENOSPC, "No space left on device")
        write(blob, data)

    monkeypatch.setattr(TemporaryBlob, "write", full_once)
    body = multipart([part10(first), part10(second)])

    async def chunks() -> AsyncIterator[bytes]:  # as a socket delivers them
        for offset in range(0, len(body), 16384):
            yield body[offset:offset + 16384]

    response = web.post(f"/dicom-web/studies/{study}", content=chunks(), headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary'})
    assert response.status_code == 202, response.text
    [failed] = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700]
    [stored] = response.json()["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [second.SOPInstanceUID]
    assert not list((web.data_dir / "tmp").iterdir())
    assert web.services.budget.ingest.in_use == 0


def test_a_stalled_body_is_408_and_gives_its_ingest_bytes_back(tmp_path: Path) -> None:
    """A client that sends half a part then nothing would hold the part's ingest bytes (and
    its temporary file) for as long as it keeps the connection: after
    http_body_timeout_seconds of silence it gets 408 and the part is deleted."""
    head_of_part = (b"--x\r\nContent-Type: application/dicom\r\n\r\n" + bytes(128)
                    + b"DICM" + bytes(2 << 20))
    with PasserelleProcess(tmp_path / "data", http_body_timeout_seconds="2") as server:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=20) as peer:
            peer.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b'Content-Type: multipart/related; type="application/dicom"; '
                         b"boundary=x\r\nContent-Length: 50000000\r\n\r\n" + head_of_part)
            deadline = time.monotonic() + 10
            while server.metric("passerelle_budget_bytes_in_use", budget="ingest_bytes") == 0:
                assert time.monotonic() < deadline, "the part was never spooled"
                time.sleep(0.05)
            started = time.monotonic()
            answer = peer.recv(4096)  # nothing more is sent
            print(f"\nanswered after {time.monotonic() - started:.1f} s of silence")
            while b"timeout" not in answer and (more := peer.recv(4096)):
                answer += more
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"http_body_timeout_seconds" in answer
        assert server.metric("passerelle_budget_bytes_in_use", budget="ingest_bytes") == 0
        assert list((server.data_dir / "tmp").iterdir()) == []


def test_the_top_level_retrieve_url_is_present_even_without_one_study(
        web: InProcessService) -> None:
    """Retrieve URL (0008,1190) is Type 2 in the Store Instances Response Module (PS3.18
    Table I.1-1): the study's URL for one study, present and empty for several or none."""
    study = generate_uid()
    one = post(web, "/studies", multipart([part10(ct_slice(study, generate_uid(), 1, n, size=4))
                                          for n in (1, 2)]))
    assert one.status_code == 200
    assert one.json()["00081190"] == {"vr": "UR", "Value": [
        f"{web.base_url}/dicom-web/studies/{study}"]}
    several = post(web, "/studies", multipart([part10(ct_slice(generate_uid(), generate_uid(),
                                                               1, 1, size=4))
                                               for _ in (1, 2)]))
    assert several.status_code == 200
    assert several.json()["00081190"] == {"vr": "UR"}
    assert len(several.json()["00081199"]["Value"]) == 2
    failed = post(web, "/studies", multipart([b"not dicom at all"]))
    assert failed.status_code == 409
    assert failed.json()["00081190"] == {"vr": "UR"}
