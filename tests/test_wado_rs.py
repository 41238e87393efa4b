"""WADO-RS retrieve (PS3.18 10.4) against a running service: dicomweb-client and raw HTTP."""

import re
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from tests.multipart import parts_of
from tests.processes import PasserelleProcess

# The national WADO-RS exchange samples (see tests/data/README.md).
REFERENCE = Path(__file__).parent / "data" / "drimm"


def test_study_series_instance_as_stored(client: DICOMwebClient, ct_study: list[Path]) -> None:
    originals = {ds.SOPInstanceUID: ds for ds in map(dcmread, ct_study)}
    first = originals[dcmread(ct_study[0]).SOPInstanceUID]
    study = client.retrieve_study(first.StudyInstanceUID)
    assert sorted(ds.SOPInstanceUID for ds in study) == sorted(originals)
    for ds in study:
        assert np.array_equal(ds.pixel_array, originals[ds.SOPInstanceUID].pixel_array)
    series = client.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert len(series) == 5
    assert {ds.SeriesInstanceUID for ds in series} == {first.SeriesInstanceUID}
    # Series order: by instance number.
    assert [ds.InstanceNumber for ds in series] == [1, 2, 3, 4, 5]
    instance = client.retrieve_instance(first.StudyInstanceUID, first.SeriesInstanceUID,
                                        first.SOPInstanceUID)
    assert instance.SOPInstanceUID == first.SOPInstanceUID


@pytest.mark.slow
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_every_stored_syntax_converted_losslessly(client: DICOMwebClient, syntax: str,
                                                  files_by_syntax: dict[UID, Path]) -> None:
    converted = 0
    for stored, path in files_by_syntax.items():
        original = dcmread(path)
        if stored == "1.2.840.10008.1.2.2":  # retired big endian: served as stored only
            continue
        try:
            expected_pixels = original.pixel_array
        except Exception:  # a sample that pydicom's own decoders cannot read: no oracle
            continue
        got = client.retrieve_instance(original.StudyInstanceUID, original.SeriesInstanceUID,
                                       original.SOPInstanceUID,
                                       media_types=(("application/dicom", syntax),))
        assert got.file_meta.TransferSyntaxUID == syntax, stored.name
        # Same object in another encoding: same UID (pydicom would mint a new one).
        assert got.SOPInstanceUID == original.SOPInstanceUID, stored.name
        assert got.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(got.pixel_array, expected_pixels), stored.name
        converted += 1
    assert converted >= 9


def test_multipart_framing_byte_for_byte(loaded: PasserelleProcess,
                                         ct_study: list[Path]) -> None:
    first = dcmread(ct_study[0])
    url = f"{loaded.base_url}/dicom-web/studies/{first.StudyInstanceUID}/series/" \
          f"{first.SeriesInstanceUID}"
    response = httpx.get(url, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    assert "transfer-syntax=1.2.840.10008.1.2.1" in content_type
    parts = parts_of(response)
    assert len(parts) == 5
    stored = {dcmread(p).SOPInstanceUID: p for p in
              (loaded.data_dir / "studies").rglob("*.dcm")}
    for headers, content in parts:
        assert headers["Content-Type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        assert int(headers["Content-Length"]) == len(content)
        assert content == stored[dcmread(BytesIO(content)).SOPInstanceUID].read_bytes()


def test_national_consumer_request_replayed(loaded: PasserelleProcess,
                                            ct_study: list[Path]) -> None:
    request = (REFERENCE / "wado-rs-series-request.txt").read_text()
    accept = re.search(r"^Accept:(.*)$", request, re.MULTILINE).group(1)
    offered = re.findall(r"transfer-syntax=([\d.]+);q=([\d.]+)", accept)
    first = dcmread(ct_study[0])
    url = f"{loaded.base_url}/dicom-web/studies/{first.StudyInstanceUID}/series/" \
          f"{first.SeriesInstanceUID}"
    # Its KOS-SOPInstanceUID header is left out: nothing is published here (see
    # tests/test_manifest_scope.py for access through a manifest).
    response = httpx.get(url, headers={"Accept": accept})
    assert response.status_code == 200
    chosen = re.search(r"transfer-syntax=([\d.]+)", response.headers["content-type"]).group(1)
    assert chosen in dict(offered)
    # Stored explicit VR LE: no encoder for 4.70 (q=0.9) here; JPEG-LS lossless (q=0.8) is
    # the highest q that can be produced, and it is lossless.
    assert chosen == "1.2.840.10008.1.2.4.80"
    parts = parts_of(response)
    assert len(parts) == 5
    originals = {dcmread(path).SOPInstanceUID: dcmread(path).pixel_array for path in ct_study}
    for _, body in parts:
        ds = dcmread(BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == chosen
        assert np.array_equal(ds.pixel_array, originals[ds.SOPInstanceUID])
    # The headers of the national sample response: type, boundary and transfer-syntax
    # parameters, an ETag, a chunked body.
    expected = (REFERENCE / "wado-rs-response-headers.txt").read_text().lower()
    assert "etag:" in expected and "transfer-encoding: chunked" in expected
    assert 'type="application/dicom"' in response.headers["content-type"]
    assert "boundary=" in response.headers["content-type"]
    assert response.headers["etag"]
    assert response.headers["transfer-encoding"] == "chunked"


@pytest.mark.parametrize("path, accept, status, message", [
    ("/studies/1.2.3.4", None, 404, "no such study"),
    ("/studies/{study}/series/1.2.3", None, 404, "no such series"),
    ("/studies/{study}/series/{series}/instances/1.2.3", None, 404, "no such instance"),
    ("/studies/1.2.abc", None, 400, "invalid study UID"),
    ("/studies/{study}", "image/png", 406, 'multipart/related; type="application/dicom"'),
    ("/studies/{study}", 'multipart/related; type="application/dicom"; '
     "transfer-syntax=1.2.840.10008.1.2.4.50", 406, "cannot convert"),
    ("/studies/{study}", "multipart/related; q=abc", 400, "invalid q value"),
    ("/studies/{study}", "nonsense", 400, "invalid media range"),
    ("/studies/{study}", "*/*;q=1," * 1500, 400, "longer than"),  # 12 KB: a head under 16 KiB
])
def test_errors(loaded: PasserelleProcess, ct_study: list[Path], path: str,
                accept: str | None, status: int, message: str) -> None:
    first = dcmread(ct_study[0])
    url = loaded.base_url + "/dicom-web" + path.format(study=first.StudyInstanceUID,
                                                       series=first.SeriesInstanceUID)
    response = httpx.get(url, headers={"Accept": accept} if accept else {})
    assert response.status_code == status
    assert message in response.text
    assert "Traceback" not in response.text
