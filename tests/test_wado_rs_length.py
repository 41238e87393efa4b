"""WADO-RS retrieve with a Content-Length (gateway.web.dicomweb.wado, stored_files): exact,
framing included, when every instance is sent as stored; chunked when one is converted or
the process holds too many files open; exact still when a file is replaced or deleted while
the response is sent.

Against a running service (uvicorn framing the body) with httpx and dicomweb-client, and
against the in-process application driven as an ASGI server would, to change the stored
files at a chosen moment: once the response has started.
"""

import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from gateway.web.dicomweb.stored_files import DESCRIPTORS
from tests.inprocess import InProcessService
from tests.multipart import parts_of
from tests.processes import PasserelleProcess
from tests.synthetic import write_ct_study

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _urls(root: str, study: Path) -> dict[str, str]:
    first = dcmread(study, stop_before_pixels=True)
    series = f"{root}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    return {"study": f"{root}/studies/{first.StudyInstanceUID}", "series": series,
            "instance": f"{series}/instances/{first.SOPInstanceUID}"}


@pytest.mark.parametrize("level", ["study", "series", "instance"])
def test_httpx_receives_exactly_the_announced_length(loaded: PasserelleProcess,
                                                     ct_study: list[Path], level: str) -> None:
    url = _urls(f"{loaded.base_url}/dicom-web", ct_study[0])[level]
    with httpx.stream("GET", url, headers={"Accept": AS_STORED}) as response:
        assert response.status_code == 200
        assert "transfer-encoding" not in response.headers
        body = b"".join(response.iter_raw())
    assert int(response.headers["content-length"]) == len(body)
    parts = parts_of(httpx.Response(200, headers=response.headers, content=body))
    assert len(parts) == {"study": 15, "series": 5, "instance": 1}[level]


def test_dicomweb_client_gets_a_content_length_at_each_level(loaded: PasserelleProcess,
                                                            ct_study: list[Path]) -> None:
    seen: list[tuple[str | None, str | None, int]] = []

    def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        seen.append((response.headers.get("Content-Length"),
                     response.headers.get("Transfer-Encoding"), len(response.content)))

    session = requests.Session()
    session.hooks["response"].append(record)
    client = DICOMwebClient(url=f"{loaded.base_url}/dicom-web", session=session)
    first = dcmread(ct_study[0], stop_before_pixels=True)
    assert len(client.retrieve_study(first.StudyInstanceUID)) == 15
    assert len(client.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID)) == 5
    instance = client.retrieve_instance(first.StudyInstanceUID, first.SeriesInstanceUID,
                                        first.SOPInstanceUID)
    assert instance.SOPInstanceUID == first.SOPInstanceUID
    assert len(seen) == 3
    for length, encoding, received in seen:
        assert encoding is None
        assert length is not None and int(length) == received


def test_a_converted_instance_is_sent_chunked(loaded: PasserelleProcess,
                                             ct_study: list[Path]) -> None:
    first = dcmread(ct_study[0])
    url = _urls(f"{loaded.base_url}/dicom-web", ct_study[0])["instance"]
    response = httpx.get(url, headers={
        "Accept": f'multipart/related; type="application/dicom"; '
                  f'transfer-syntax={JPEG2000Lossless}'})
    assert response.status_code == 200
    assert response.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.headers
    (headers, content), = parts_of(response)
    assert int(headers["Content-Length"]) == len(content)
    got = dcmread(io.BytesIO(content))
    assert got.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert (got.pixel_array == first.pixel_array).all()


# --- the in-process application, files changed once the response has started -------------

def _asgi_get(app: Any, path: str, when_started: Callable[[], None] = lambda: None,
              leave_when_started: bool = False) -> tuple[dict[str, str], bytes]:
    """GET ``path`` from the ASGI ``app`` as a server would; ``when_started`` runs once the
    response head is sent, before any of the body; the client leaves then if
    ``leave_when_started``. The response headers and the body received."""

    async def run() -> tuple[dict[str, str], bytes]:
        head: dict[str, str] = {}
        body = bytearray()
        started = anyio.Event()
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await started.wait()
            if leave_when_started:
                return {"type": "http.disconnect"}
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                head.update((k.decode(), v.decode()) for k, v in message["headers"])
                head["status"] = str(message["status"])
                when_started()
                started.set()
            elif message["type"] == "http.response.body" and not leave_when_started:
                body.extend(message.get("body", b""))  # once left, dropped (as uvicorn does)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": "1.1", "method": "GET", "scheme": "http", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"passerelle.test"), (b"accept", AS_STORED.encode())],
                 "client": ("127.0.0.1", 40000), "server": ("passerelle.test", 80)}
        await app(scope, receive, send)
        return head, bytes(body)

    return anyio.run(run)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[InProcessService, list[Path]]]:
    """An in-process service (duplicates overwrite) holding a 2 x 4 CT study."""
    study = write_ct_study(tmp_path / "ct", series=2, per_series=4)
    with InProcessService(tmp_path / "data", duplicate_policy="overwrite") as service:
        service.ingest_all(study)
        yield service, study


def _stored_file(service: InProcessService, source: Path) -> Path:
    instance = service.store.index.find_instance(dcmread(source).SOPInstanceUID)
    assert instance is not None
    return service.store.blobs.absolute(instance.path)


def _replace_and_delete(service: InProcessService, study: list[Path]) -> Callable[[], None]:
    """What changes the study: its first instance received again, larger (overwriting
    it), the file of its second deleted."""
    def change() -> None:
        replacement = dcmread(study[0])
        replacement.ImageComments = "received again " * 200
        result = service.ingest(replacement)
        assert result.accepted and result.replaced, result.message
        _stored_file(service, study[1]).unlink()
    return change


def _open_dicom_files(folder: Path) -> list[str]:
    """The DICOM files under ``folder`` (deleted or not) this process has open."""
    links = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            links.append(str(fd.readlink()))
        except FileNotFoundError:  # closed meanwhile (the listing's own descriptor)
            continue
    return [link for link in links if link.startswith(str(folder)) and ".dcm" in link]


def test_the_announced_length_holds_while_files_are_replaced_and_deleted(
        service: tuple[InProcessService, list[Path]]) -> None:
    app, study = service[0].app, service[1]
    before = {dcmread(p).SOPInstanceUID: _stored_file(service[0], p).read_bytes()
              for p in study}
    path = f"/dicom-web/studies/{dcmread(study[0]).StudyInstanceUID}"
    head, body = _asgi_get(app, path, _replace_and_delete(*service))
    assert head["status"] == "200"
    assert int(head["content-length"]) == len(body)
    parts = parts_of(httpx.Response(200, headers=head, content=body))
    # What was measured is what is sent: the files as they were when the response started.
    assert sorted(content for _, content in parts) == sorted(before.values())
    assert not _open_dicom_files(service[0].data_dir)


def test_without_room_for_the_files_the_response_is_chunked_and_framed_right(
        service: tuple[InProcessService, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DESCRIPTORS, "capacity", 0)
    app, study = service[0].app, service[1]
    path = f"/dicom-web/studies/{dcmread(study[0]).StudyInstanceUID}"
    head, body = _asgi_get(app, path, _replace_and_delete(*service))
    assert head["status"] == "200"
    assert "content-length" not in head
    parts = parts_of(httpx.Response(200, headers=head, content=body))
    # Each file opened as it comes: the deleted one left out, each part framed by the size
    # of the file it was read from, the replaced one included.
    assert len(parts) == 7
    assert all(int(headers["Content-Length"]) == len(content) for headers, content in parts)
    replaced = _stored_file(service[0], study[0]).read_bytes()
    assert replaced in [content for _, content in parts]
    assert not _open_dicom_files(service[0].data_dir)


def test_a_client_leaving_releases_the_files(
        service: tuple[InProcessService, list[Path]]) -> None:
    app, study = service[0].app, service[1]
    path = f"/dicom-web/studies/{dcmread(study[0]).StudyInstanceUID}"
    head, _ = _asgi_get(app, path, leave_when_started=True)
    assert "content-length" in head
    assert not _open_dicom_files(service[0].data_dir)
    assert DESCRIPTORS.take(DESCRIPTORS.capacity)  # all the room given back
    DESCRIPTORS.give_back(DESCRIPTORS.capacity)


def test_a_study_deleted_before_the_response_is_not_found(
        service: tuple[InProcessService, list[Path]]) -> None:
    app, study = service[0].app, service[1]
    for source in study:
        _stored_file(service[0], source).unlink()
    head, body = _asgi_get(app, f"/dicom-web/studies/{dcmread(study[0]).StudyInstanceUID}")
    assert head["status"] == "404", body
    assert re.search(rb"deleted", body)
