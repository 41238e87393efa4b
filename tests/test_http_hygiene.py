"""ETag / If-None-Match, CORS, and the Accept table of real clients (in-process: HTTP
semantics of the application, no socket needed)."""

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import RLELossless, generate_uid
from sqlalchemy import text

from gateway.web.dicomweb.frames import choose_frame_encoding
from gateway.web.http.accept import dicom_transfer_syntaxes, parse_accept
from storage.store import Outcome
from tests.inprocess import InProcessService
from tests.synthetic import ct_slice

EVRLE = "1.2.840.10008.1.2.1"
DICOM_ANY = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


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


def _received_long_ago(web: InProcessService, when: float) -> None:
    """Every stored instance as if received at ``when`` (an hour ago, say): a Last-Modified
    is only sent once the second it names is settled."""
    with web.store.index.transaction() as db:
        db.execute(text("UPDATE instances SET received_at = :when"), {"when": when})


def test_last_modified_and_if_modified_since_on_every_retrieve(web: InProcessService) -> None:
    """RFC 9110 8.8.2, 13.1.3: Last-Modified is when the newest instance served was received;
    If-Modified-Since of that date is a 304, of an earlier one a 200; If-None-Match, when
    sent, decides alone."""
    study, series = generate_uid(), generate_uid()
    first = ct_slice(study, series, 1, 1, size=8)
    assert web.ingest(first).outcome is Outcome.STORED
    assert web.ingest(ct_slice(study, series, 1, 2, size=8)).outcome is Outcome.STORED
    instance = f"/dicom-web/studies/{study}/series/{series}/instances/{first.SOPInstanceUID}"
    urls = {f"/dicom-web/studies/{study}": DICOM_ANY, f"/dicom-web/studies/{study}/series/"
            f"{series}": DICOM_ANY, instance: DICOM_ANY, f"{instance}/frames/1": {},
            f"{instance}/bulkdata/7FE00010": {}, f"/dicom-web/studies/{study}/metadata": {},
            f"{instance}/metadata": {}}
    received = 1_700_000_000.75
    _received_long_ago(web, received)
    stamp = "Tue, 14 Nov 2023 22:13:20 GMT"  # the second of ``received``
    for url, accept in urls.items():
        response = web.get(url, headers=accept)
        assert response.status_code == 200, url
        assert response.headers["last-modified"] == stamp, url
        same = web.get(url, headers={**accept, "If-Modified-Since": stamp})
        assert (same.status_code, same.content) == (304, b""), url
        assert same.headers["last-modified"] == stamp, url
        earlier = "Tue, 14 Nov 2023 22:13:19 GMT"
        assert web.get(url, headers={**accept, "If-Modified-Since": earlier}
                       ).status_code == 200, url
        assert web.get(url, headers={**accept, "If-Modified-Since": "yesterday"}
                       ).status_code == 200, url  # not a date: ignored
        assert web.get(url, headers={**accept, "If-Modified-Since": stamp,
                                     "If-None-Match": '"other"'}).status_code == 200, url
        if "etag" in response.headers:
            assert web.get(url, headers={**accept, "If-None-Match": response.headers["etag"]}
                           ).headers["last-modified"] == stamp
    # An instance received now: the study is modified, and its second is not settled yet
    # (a second reception within it could not be told apart): no Last-Modified.
    assert web.ingest(ct_slice(study, series, 1, 3, size=8)).outcome is Outcome.STORED
    fresh = web.get(f"/dicom-web/studies/{study}", headers={**DICOM_ANY,
                                                             "If-Modified-Since": stamp})
    assert fresh.status_code == 200
    assert "last-modified" not in fresh.headers


def test_cors_preflight_for_head(make_web: Callable[..., InProcessService]) -> None:
    """HEAD is served wherever GET is: a browser's preflight for it is allowed too."""
    web = make_web("cors", cors_allow_origins="https://viewer.example.org")
    origin = {"Origin": "https://viewer.example.org"}
    study, series = generate_uid(), generate_uid()
    assert web.ingest(ct_slice(study, series, 1, 1, size=8)).outcome is Outcome.STORED
    for url in ("/dicom-web/studies", f"/dicom-web/studies/{study}",
                f"/dicom-web/studies/{study}/metadata"):
        preflight = web.options(url, headers={
            **origin, "Access-Control-Request-Method": "HEAD",
            "Access-Control-Request-Headers": "accept, if-modified-since, if-none-match"})
        assert preflight.status_code == 200, (url, preflight.text)
        assert "HEAD" in preflight.headers["access-control-allow-methods"]
        head = web.request("HEAD", url, headers={**origin, "Accept": "*/*"})
        assert head.status_code == 200, url
        assert head.headers["access-control-allow-origin"] == origin["Origin"]
        assert "last-modified" in head.headers["access-control-expose-headers"].lower()


def test_cache_headers_and_conditionals_on_every_wado_answer(web: InProcessService) -> None:
    """Every WADO-RS 200 and 304 says ``Cache-Control: private, no-cache`` (no heuristic
    freshness, RFC 9111 4.2.2) and what it varies with, the 304 as its 200 (RFC 9110
    15.4.5); an asctime If-Modified-Since is GMT; If-None-Match: * is a 304 for an existing
    resource and nothing else (13.1.2, 13.2.1)."""
    study, series = generate_uid(), generate_uid()
    first = ct_slice(study, series, 1, 1, size=8)
    assert web.ingest(first).outcome is Outcome.STORED
    _received_long_ago(web, 1_700_000_000.75)
    instance = f"/dicom-web/studies/{study}/series/{series}/instances/{first.SOPInstanceUID}"
    urls = {f"/dicom-web/studies/{study}": DICOM_ANY, f"{instance}/frames/1": {},
            f"{instance}/bulkdata/7FE00010": {}, f"/dicom-web/studies/{study}/metadata": {},
            f"{study}/metadata xml": {}}
    xml = {"Accept": 'multipart/related; type="application/dicom+xml"'}
    for url, accept in urls.items():
        if url.endswith(" xml"):
            url, accept = f"/dicom-web/studies/{study}/metadata", xml
        response = web.get(url, headers=accept)
        assert response.status_code == 200, url
        vary = response.headers["vary"]
        assert response.headers["cache-control"] == "private, no-cache", url
        assert {"Accept", "KOS-SOPInstanceUID"} <= {v.strip() for v in vary.split(",")}, url
        for condition in ({"If-Modified-Since": "Tue Nov 14 22:13:20 2023"},
                          {"If-None-Match": "*"}):
            same = web.get(url, headers={**accept, **condition})
            assert same.status_code == 304, (url, condition)
            assert same.headers["cache-control"] == "private, no-cache", url
            assert same.headers["vary"] == vary, url
    missing = {f"{instance}/frames/2", f"{instance}/bulkdata/00880200/1/7FE00010",
               f"{instance}/bulkdata/00100020"}
    for url in missing:
        for condition in ({"If-Modified-Since": "Tue, 14 Nov 2023 22:13:20 GMT"},
                          {"If-None-Match": "*"}):
            assert web.get(url, headers=condition).status_code == 404, (url, condition)


def test_frames_etag_names_the_media_type(web: InProcessService) -> None:
    """Frames as stored and decoded are two representations: a copy of one is no 304 for
    the other."""
    study, series = generate_uid(), generate_uid()
    ds = ct_slice(study, series, 1, 1, size=8)
    ds.compress(RLELossless)
    assert web.ingest(ds).outcome is Outcome.STORED
    frame = (f"/dicom-web/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}"
             "/frames/1")
    rle = web.get(frame, headers={"Accept": 'multipart/related; type="image/dicom-rle"'})
    native = {"Accept": 'multipart/related; type="application/octet-stream"'}
    decoded = web.get(frame, headers=native)
    assert (rle.status_code, decoded.status_code) == (200, 200)
    assert rle.headers["etag"] != decoded.headers["etag"]
    assert web.get(frame, headers={**native, "If-None-Match": rle.headers["etag"]}
                   ).status_code == 200
    assert web.get(frame, headers={**native, "If-None-Match": decoded.headers["etag"]}
                   ).status_code == 304
