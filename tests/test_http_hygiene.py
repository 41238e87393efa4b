"""ETag / If-None-Match, CORS, and the Accept table of real clients (in-process: HTTP
semantics of the application, no socket needed)."""

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from gateway.web.dicomweb.frames import choose_frame_encoding
from gateway.web.http.accept import dicom_transfer_syntaxes, parse_accept
from storage.store import Outcome
from tests.inprocess import InProcessService
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


def test_etags_and_conditional_requests(web: InProcessService) -> None:
    study, series = generate_uid(), generate_uid()
    assert web.ingest(ct_slice(study, series, 1, 1, size=8)).outcome is Outcome.STORED
    root = f"/dicom-web/studies/{study}"
    for url in (f"{root}/metadata", root, "/dicom-web/studies"):
        first = web.get(url)
        assert first.status_code == 200
        etag = first.headers["etag"]
        again = web.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304
        assert again.content == b""
        assert web.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    before = web.get(f"{root}/metadata").headers["etag"]
    assert web.ingest(ct_slice(study, series, 1, 2, size=8)).outcome is Outcome.STORED
    changed = web.get(f"{root}/metadata", headers={"If-None-Match": before})
    assert changed.status_code == 200
    assert len(changed.json()) == 2


def test_cors_only_when_configured(web: InProcessService,
                                   make_web: Callable[..., InProcessService]) -> None:
    origin = {"Origin": "https://viewer.example.org"}
    plain = web.get("/dicom-web/studies", headers=origin)
    assert "access-control-allow-origin" not in plain.headers
    other = make_web("cors", cors_allow_origins="https://viewer.example.org")
    url = "/dicom-web/studies"
    preflight = other.options(url, headers={
        **origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "accept, authorization, kos-sopinstanceuid"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin["Origin"]
    response = other.get(url, headers=origin)
    assert response.headers["access-control-allow-origin"] == origin["Origin"]
    assert "etag" in response.headers["access-control-expose-headers"].lower()
    stranger = other.get(url, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in stranger.headers


def test_content_length_on_every_part(loaded_web: InProcessService,
                                      ct_study: list[Path]) -> None:
    ds = dcmread(ct_study[0])
    response = loaded_web.get(f"/dicom-web/studies/{ds.StudyInstanceUID}")
    assert response.status_code == 200
    assert response.content.count(b"Content-Length: ") == 15
