"""Rendered images (WADO-RS /rendered, WADO-URI) against a running service, compared with
an independent oracle: pydicom's own Modality LUT, windowing and colour LUT functions."""

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_windowing
from pydicom.uid import generate_uid

from tests.conftest import _local_test_files
from tests.multipart import parts_of
from tests.processes import PasserelleProcess
from tests.scu import send
from tests.synthetic import ct_slice

SAMPLES = ["RG1_UNCI.dcm", "OBXXXX1A.dcm", "SC_rgb.dcm", "emri_small_RLE.dcm",
           "SC_rgb_rle_16bit_2frame.dcm", "MR_small_jpeg_ls_lossless.dcm", "693_J2KR.dcm"]


def sample(name: str) -> Path:
    return next(p for p in _local_test_files() if p.name == name)


@pytest.fixture(scope="module")
def imaging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasserelleProcess]:
    """A service holding a synthetic CT slice, pydicom samples, and an SR (no pixels)."""
    server = PasserelleProcess(tmp_path_factory.mktemp("render") / "data").start()
    for name in SAMPLES:
        assert send(server.dicom_port, sample(name))[0] == 0x0000
    assert send(server.dicom_port, _ct())[0] == 0x0000
    report = _ct(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11", Modality="SR")
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(report, keyword)
    assert send(server.dicom_port, report)[0] == 0x0000
    yield server
    server.stop()


_CT_STUDY, _CT_SERIES = generate_uid(), generate_uid()


def _ct(**attributes: object) -> Dataset:
    sop = "1.2.3.4.100" if "SOPClassUID" not in attributes else "1.2.3.4.200"
    return ct_slice(_CT_STUDY, _CT_SERIES, 1, 1, size=64, sop_uid=sop, BitsStored=16,
                    HighBit=15, **attributes)


def url(server: PasserelleProcess, ds: Dataset, suffix: str = "/rendered") -> str:
    return (f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{suffix}")


def png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(BytesIO(response.content)))


def oracle_gray(ds: Dataset, frame: np.ndarray, center: float | None = None,
                width: float | None = None) -> np.ndarray:
    """pydicom's windowing, rescaled from its output range to 0..255."""
    values = apply_modality_lut(frame, ds)
    if center is not None:
        ds = ds.copy()
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.VOILUTFunction = "LINEAR"
    out = apply_windowing(values, ds)
    bits = ds.BitsStored
    low = 0 if ds.PixelRepresentation == 0 else -(1 << (bits - 1))
    high = low + (1 << bits) - 1
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    y_min, y_max = low * slope + intercept, high * slope + intercept
    result = np.rint((out - y_min) / (y_max - y_min) * 255)
    return 255 - result if ds.PhotometricInterpretation == "MONOCHROME1" else result


def test_ct_window_from_the_instance_and_from_the_request(imaging: PasserelleProcess) -> None:
    ds = _ct()
    got = png(httpx.get(url(imaging, ds), headers={"Accept": "image/png"}))
    assert np.abs(got.astype(int) - oracle_gray(ds, ds.pixel_array)).max() <= 1
    got = png(httpx.get(url(imaging, ds), params={"window": "300,1500"},
                        headers={"Accept": "image/png"}))
    assert np.abs(got.astype(int) - oracle_gray(ds, ds.pixel_array, 300, 1500)).max() <= 1


def test_monochrome1_is_inverted(imaging: PasserelleProcess) -> None:
    ds = dcmread(sample("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    got = png(httpx.get(url(imaging, ds), headers={"Accept": "image/png"}))
    expected = oracle_gray(ds, ds.pixel_array)
    assert np.abs(got.astype(int) - expected).max() <= 1
    # Dark where the stored values are high: the inversion really happened.
    bright = ds.pixel_array > np.percentile(ds.pixel_array, 99)
    assert got[bright].mean() < 64


def test_palette_colour(imaging: PasserelleProcess) -> None:
    ds = dcmread(sample("OBXXXX1A.dcm"))
    got = png(httpx.get(url(imaging, ds), headers={"Accept": "image/png"}))
    rgb = apply_color_lut(ds.pixel_array, ds)
    expected = rgb >> 8 if rgb.dtype == np.uint16 else rgb
    assert np.array_equal(got, expected.astype(np.uint8))


def test_rgb_exact_in_png_and_close_in_jpeg(imaging: PasserelleProcess) -> None:
    ds = dcmread(sample("SC_rgb.dcm"))
    assert np.array_equal(png(httpx.get(url(imaging, ds), headers={"Accept": "image/png"})),
                          ds.pixel_array)
    jpeg = httpx.get(url(imaging, ds))
    assert jpeg.headers["content-type"] == "image/jpeg"
    decoded = np.asarray(Image.open(BytesIO(jpeg.content))).astype(int)
    assert np.abs(decoded - ds.pixel_array).mean() < 3


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "693_J2KR.dcm"])
def test_compressed_grayscale(imaging: PasserelleProcess, name: str) -> None:
    ds = dcmread(sample(name))
    got = png(httpx.get(url(imaging, ds), headers={"Accept": "image/png"}))
    if "WindowCenter" in ds:
        expected = oracle_gray(ds, ds.pixel_array)
    else:  # no window: min/max of the frame
        values = apply_modality_lut(ds.pixel_array, ds).astype(float)
        expected = np.rint((values - values.min()) / (values.max() - values.min()) * 255)
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_multiframe_rendered_is_multipart(imaging: PasserelleProcess) -> None:
    ds = dcmread(sample("emri_small_RLE.dcm"))
    response = httpx.get(url(imaging, ds))
    assert response.status_code == 200
    assert 'type="image/jpeg"' in response.headers["content-type"]
    parts = parts_of(response)
    assert len(parts) == int(ds.NumberOfFrames)
    assert all(Image.open(BytesIO(body)).format == "JPEG" for _, body in parts)
    one = httpx.get(url(imaging, ds, "/frames/3/rendered"), headers={"Accept": "image/png"})
    assert png(one).shape == (ds.Rows, ds.Columns)


def test_viewport_keeps_the_aspect(imaging: PasserelleProcess) -> None:
    ds = dcmread(sample("SC_rgb.dcm"))
    image = Image.open(BytesIO(httpx.get(url(imaging, ds),
                                         params={"viewport": "50,20"}).content))
    assert image.size[0] <= 50 and image.size[1] <= 20
    assert max(image.size) in (50, 20)


def test_wado_uri(imaging: PasserelleProcess) -> None:
    ds = _ct()
    base = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID}
    jpeg = httpx.get(f"{imaging.base_url}/wado", params=base)
    assert jpeg.headers["content-type"] == "image/jpeg"
    got = png(httpx.get(f"{imaging.base_url}/wado", params={
        **base, "contentType": "image/png", "windowCenter": "300", "windowWidth": "1500"}))
    assert np.abs(got.astype(int) - oracle_gray(ds, ds.pixel_array, 300, 1500)).max() <= 1
    small = png(httpx.get(f"{imaging.base_url}/wado", params={
        **base, "contentType": "image/png", "rows": "32", "columns": "32",
        "region": "0,0,0.5,0.5"}))
    assert small.shape == (32, 32)
    gif = httpx.get(f"{imaging.base_url}/wado", params={**base, "contentType": "image/gif"})
    assert Image.open(BytesIO(gif.content)).format == "GIF"
    dicom = httpx.get(f"{imaging.base_url}/wado", params={**base,
                                                          "contentType": "application/dicom"})
    assert dicom.headers["content-type"] == "application/dicom"
    assert dcmread(BytesIO(dicom.content)).SOPInstanceUID == ds.SOPInstanceUID


def test_wado_uri_anonymize(imaging: PasserelleProcess) -> None:
    ds = _ct()
    query = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
             "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID,
             "contentType": "application/dicom", "anonymize": "yes"}
    first = dcmread(BytesIO(httpx.get(f"{imaging.base_url}/wado", params=query).content))
    assert first.PatientIdentityRemoved == "YES"
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "ReferringPhysicianName"):
        assert not first.get(keyword), keyword
    assert first.PatientBirthDate != ds.PatientBirthDate
    assert first.StudyInstanceUID != ds.StudyInstanceUID
    assert first.SOPInstanceUID != ds.SOPInstanceUID
    assert np.array_equal(first.pixel_array, ds.pixel_array)
    again = dcmread(BytesIO(httpx.get(f"{imaging.base_url}/wado", params=query).content))
    assert again.StudyInstanceUID == first.StudyInstanceUID  # stable across requests
    key = imaging.data_dir / "deidentify.key"
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("path, params, headers, status, message", [
    ("sr", {}, {}, 422, "no pixel data"),
    ("ct", {"window": "40"}, {}, 400, "window takes 2"),
    ("ct", {"window": "40,400,cubic"}, {}, 400, "window function"),
    ("ct", {"viewport": "0,10"}, {}, 400, "viewport sizes"),
    ("ct", {"quality": "101"}, {}, 400, "quality must be"),
    ("ct", {}, {"Accept": "application/json"}, 406, "image/jpeg"),
    ("ct-frame-9", {}, {}, 404, "1 frame"),
])
def test_rendered_errors(imaging: PasserelleProcess, path: str, params: dict, headers: dict,
                         status: int, message: str) -> None:
    ds = _ct() if path != "sr" else _ct(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11")
    suffix = "/frames/9/rendered" if path == "ct-frame-9" else "/rendered"
    response = httpx.get(url(imaging, ds, suffix), params=params, headers=headers)
    assert response.status_code == status
    assert message in response.text


@pytest.mark.parametrize("params, status, message", [
    ({}, 400, "requestType must be WADO"),
    ({"requestType": "WADO", "studyUID": "1.2", "seriesUID": "x", "objectUID": "1.3"}, 400,
     "seriesUID must be a valid UID"),
    ({"requestType": "WADO", "studyUID": "1.2", "seriesUID": "1.3", "objectUID": "1.4"}, 404,
     "no such object"),
    ({"contentType": "text/html"}, 400, "contentType"),
    ({"region": "0.5,0,0.2,1"}, 400, "region is"),
    ({"anonymize": "yes"}, 400, "anonymize=yes applies to contentType=application/dicom"),
    ({"anonymize": "maybe", "contentType": "application/dicom"}, 400, "anonymize must be"),
])
def test_wado_uri_errors(imaging: PasserelleProcess, params: dict, status: int,
                         message: str) -> None:
    ds = _ct()
    base = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID}
    query = params if "requestType" in params or not params else {**base, **params}
    response = httpx.get(f"{imaging.base_url}/wado", params=query)
    assert response.status_code == status
    assert message in response.text
