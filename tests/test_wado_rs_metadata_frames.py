"""WADO-RS metadata, frames and bulk data: dicomweb-client against a running service over a
socket, and the HTTP details (encodings, media types, errors, caching) in-process."""

import gzip
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import UID, JPEGBaseline8Bit, RLELossless, generate_uid

from storage.store import Outcome
from tests.inprocess import InProcessService
from tests.multipart import parts_of
from tests.synthetic import ct_slice


def _by_syntax(files_by_syntax: dict[UID, Path], syntax: str) -> Dataset:
    return dcmread(files_by_syntax[UID(syntax)])


def test_study_metadata_is_dicom_json(client: DICOMwebClient, ct_study: list[Path]) -> None:
    first = dcmread(ct_study[0])
    items = client.retrieve_study_metadata(first.StudyInstanceUID)
    assert len(items) == 15
    item = next(i for i in items if i["00080018"]["Value"] == [first.SOPInstanceUID])
    assert item["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DUPONT^JEAN"}]}
    assert item["00280010"] == {"vr": "US", "Value": [64]}
    pixel_uri = item["7FE00010"]["BulkDataURI"]
    assert pixel_uri.endswith(f"/instances/{first.SOPInstanceUID}/bulkdata/7FE00010")
    assert "InlineBinary" not in str(items)
    # The BulkDataURI resolves to the pixel data.
    [frame] = client.retrieve_bulkdata(pixel_uri)
    assert frame == first.PixelData
    # Series and instance levels narrow the answer.
    assert len(client.retrieve_series_metadata(first.StudyInstanceUID,
                                               first.SeriesInstanceUID)) == 5
    one = client.retrieve_instance_metadata(first.StudyInstanceUID, first.SeriesInstanceUID,
                                            first.SOPInstanceUID)
    assert one == item


def test_metadata_is_gzipped_on_request(loaded_web: InProcessService,
                                        ct_study: list[Path]) -> None:
    study = dcmread(ct_study[0]).StudyInstanceUID
    url = f"/dicom-web/studies/{study}/metadata"
    response, raw = loaded_web.raw("GET", url, headers={"Accept-Encoding": "gzip"})
    assert response.headers["content-type"] == "application/dicom+json"
    assert response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw).startswith(b"[{")


def test_native_frames(client: DICOMwebClient, files_by_syntax: dict[UID, Path]) -> None:
    original = _by_syntax(files_by_syntax, "1.2.840.10008.1.2.1")
    frames = client.retrieve_instance_frames(original.StudyInstanceUID,
                                             original.SeriesInstanceUID,
                                             original.SOPInstanceUID, frame_numbers=[1])
    assert frames == [original.PixelData]


def test_compressed_frames_as_stored_and_decoded(client: DICOMwebClient,
                                                 files_by_syntax: dict[UID, Path]) -> None:
    original = _by_syntax(files_by_syntax, RLELossless)
    count = int(original.NumberOfFrames)
    assert count > 3
    stored = list(generate_frames(original.PixelData, number_of_frames=count))
    uids = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    as_stored = client.retrieve_instance_frames(
        *uids, frame_numbers=[1, 3], media_types=(("image/x-dicom-rle", RLELossless),))
    assert as_stored == [stored[0], stored[2]]
    decoded = client.retrieve_instance_frames(
        *uids, frame_numbers=[2], media_types=(("application/octet-stream",),))
    assert decoded == [original.pixel_array[1].tobytes()]


def test_jpeg_frames_keep_their_media_type(loaded_web: InProcessService,
                                           files_by_syntax: dict[UID, Path]) -> None:
    original = _by_syntax(files_by_syntax, JPEGBaseline8Bit)
    url = (f"/dicom-web/studies/{original.StudyInstanceUID}/series/"
           f"{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}/frames/2")
    response = loaded_web.get(url, headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert response.status_code == 200
    assert 'type="image/jpeg"' in response.headers["content-type"]
    [(headers, jpeg)] = parts_of(response)
    assert headers["Content-Type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
    stored = list(generate_frames(original.PixelData, number_of_frames=original.NumberOfFrames))
    assert jpeg == stored[1]
    assert Image.open(BytesIO(jpeg)).size == (640, 480)


@pytest.mark.parametrize("suffix, status, message", [
    ("frames/0", 400, "numbers from 1"),
    ("frames/1,x", 400, "frame list"),
    ("frames/99", 404, "has 1 frame"),
    ("frames/1,1", 400, "2 frames asked of an instance that has 1"),
    ("bulkdata/zz", 400, "8 hexadecimal digits"),
    ("bulkdata/00431029", 404, "no binary value"),
])
def test_frame_and_bulkdata_errors(loaded_web: InProcessService, ct_study: list[Path],
                                   suffix: str, status: int, message: str) -> None:
    ds = dcmread(ct_study[0])
    url = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/"
           f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/{suffix}")
    response = loaded_web.get(url)
    assert response.status_code == status
    assert message in response.text


def test_cached_metadata_follows_replacement_and_public_url(
        make_web: Callable[..., InProcessService]) -> None:
    service = make_web(duplicate_policy="overwrite")
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    url = f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata"
    assert service.ingest(ds).outcome is Outcome.STORED
    assert service.get(url).json()[0]["00100010"]["Value"] == [{"Alphabetic": "DUPONT^JEAN"}]
    ds.PatientName = "DURAND^ANNE"
    assert service.ingest(ds).accepted
    assert service.get(url).json()[0]["00100010"]["Value"] == [{"Alphabetic": "DURAND^ANNE"}]
    service.close()
    # Started again on the same data dir, under another public URL.
    service = make_web(public_url="https://imaging.example.org/pacs")
    [item] = service.get(url).json()
    assert item["7FE00010"]["BulkDataURI"].startswith(
        "https://imaging.example.org/pacs/dicom-web/studies/")
