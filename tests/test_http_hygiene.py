"""ETag / If-None-Match, CORS, and the Accept table of real clients."""

from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from gateway.web.dicomweb.frames import choose_frame_encoding
from gateway.web.http.accept import dicom_transfer_syntaxes, parse_accept
from tests.processes import PasserelleProcess
from tests.scu import send
from tests.synthetic import ct_slice

EVRLE = "1.2.840.10008.1.2.1"


@pytest.mark.parametrize("client, accept, syntaxes", [
    ("curl", "*/*", [EVRLE]),
    ("no header", None, [EVRLE]),
    ("browser", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", [EVRLE]),
    ("OHIF / dicomweb-client", 'multipart/related; type="application/dicom"; '
     "transfer-syntax=*", ["*"]),
    ("dcm4che", 'multipart/related;type="application/dicom"', [EVRLE]),
    ("Weasis", 'multipart/related;type="application/dicom";transfer-syntax=1.2.840.10008.1.2.4.90'
     ', multipart/related;type="application/dicom";transfer-syntax=1.2.840.10008.1.2.1;q=0.5',
     ["1.2.840.10008.1.2.4.90", EVRLE]),
    ("unquoted type", "multipart/related; type=application/dicom; transfer-syntax=*", ["*"]),
    ("image only", "image/jpeg", []),
    ("refused", 'multipart/related; type="application/dicom"; q=0', []),
])
def test_accept_table_of_real_clients(client: str, accept: str | None,
                                      syntaxes: list[str]) -> None:
    assert dicom_transfer_syntaxes(parse_accept(accept)) == syntaxes, client


@pytest.mark.parametrize("stored, accept, content_type", [
    (EVRLE, "multipart/related; type=application/octet-stream; transfer-syntax=*",
     f"application/octet-stream; transfer-syntax={EVRLE}"),
    ("1.2.840.10008.1.2.4.90", "multipart/related; type=application/octet-stream; "
     "transfer-syntax=*", "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.90"),
    ("1.2.840.10008.1.2.4.90", 'multipart/related; type="image/jp2"',
     "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90"),
    # */* means the PS3.18 default for frames: uncompressed octet-stream (decoded) ...
    ("1.2.840.10008.1.2.4.90", "*/*", f"application/octet-stream; transfer-syntax={EVRLE}"),
    # ... while a multipart of any type takes the frames as stored.
    ("1.2.840.10008.1.2.4.90", 'multipart/related; type="*/*"',
     "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90"),
    ("1.2.840.10008.1.2.4.90", 'multipart/related; type="application/octet-stream"',
     f"application/octet-stream; transfer-syntax={EVRLE}"),
])
def test_frame_media_types(stored: str, accept: str, content_type: str) -> None:
    encoding = choose_frame_encoding(stored, parse_accept(accept))
    assert encoding is not None
    assert encoding.content_type == content_type


def test_etags_and_conditional_requests(server: PasserelleProcess) -> None:
    study, series = generate_uid(), generate_uid()
    assert send(server.dicom_port, ct_slice(study, series, 1, 1, size=8))[0] == 0
    root = f"{server.base_url}/dicom-web/studies/{study}"
    for url in (f"{root}/metadata", root, f"{server.base_url}/dicom-web/studies"):
        first = httpx.get(url)
        assert first.status_code == 200
        etag = first.headers["etag"]
        again = httpx.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304
        assert again.content == b""
        assert httpx.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    before = httpx.get(f"{root}/metadata").headers["etag"]
    assert send(server.dicom_port, ct_slice(study, series, 1, 2, size=8))[0] == 0
    changed = httpx.get(f"{root}/metadata", headers={"If-None-Match": before})
    assert changed.status_code == 200
    assert len(changed.json()) == 2


def test_cors_only_when_configured(server: PasserelleProcess, tmp_path: Path) -> None:
    origin = {"Origin": "https://viewer.example.org"}
    plain = httpx.get(f"{server.base_url}/dicom-web/studies", headers=origin)
    assert "access-control-allow-origin" not in plain.headers
    other = PasserelleProcess(tmp_path / "cors",
                              cors_allow_origins="https://viewer.example.org").start()
    try:
        url = f"{other.base_url}/dicom-web/studies"
        preflight = httpx.options(url, headers={
            **origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "accept, authorization, kos-sopinstanceuid"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin["Origin"]
        response = httpx.get(url, headers=origin)
        assert response.headers["access-control-allow-origin"] == origin["Origin"]
        assert "etag" in response.headers["access-control-expose-headers"].lower()
        stranger = httpx.get(url, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers
    finally:
        other.stop()


def test_content_length_on_every_part(loaded: PasserelleProcess, ct_study: list[Path]) -> None:
    ds = dcmread(ct_study[0])
    response = httpx.get(f"{loaded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}")
    assert response.status_code == 200
    assert response.content.count(b"Content-Length: ") == 15
