"""Rendered images (WADO-RS /rendered, WADO-URI), compared with an independent oracle:
pydicom's own Modality LUT, windowing and colour LUT functions. In-process (the rendering is
the point, not the socket), but for dicomweb-client against a running service."""

import copy
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing
from pydicom.uid import generate_uid

from tests.conftest import _local_test_files
from tests.inprocess import InProcessService
from tests.multipart import parts_of
from tests.processes import PasserelleProcess
from tests.scu import send
from tests.synthetic import ct_slice

SAMPLES = ["RG1_UNCI.dcm", "OBXXXX1A.dcm", "SC_rgb.dcm", "emri_small_RLE.dcm"]


def sample(name: str) -> Path:
    return next(p for p in _local_test_files() if p.name == name)


def stored(name: str) -> Dataset:
    """A sample under a SOP Instance UID of its own: several samples are one object in
    different encodings, under one UID."""
    ds = dcmread(sample(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[name])
    return ds


@pytest.fixture(scope="module")
def imaging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessService]:
    """The application in-process, holding a synthetic CT slice, pydicom samples, and an SR
    (no pixels)."""
    with InProcessService(tmp_path_factory.mktemp("render") / "data") as service:
        service.ingest_all(sample(name) for name in SAMPLES)
        # SC_rgb_rle_16bit_2frame.dcm has the SOP Instance UID of SC_rgb.dcm, another data
        # set: under its own UID, or it is refused (keep-first).
        service.ingest_all(stored(name) for name in
                           sorted({*GRAY, *(name for pair in COLOUR for name in pair[:2]),
                                   "SC_rgb_rle_16bit_2frame.dcm"}))
        service.ingest_all(SYNTHETIC)
        service.ingest_all([_ct()])
        report = _ct(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11", Modality="SR")
        report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
        for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                        "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
            delattr(report, keyword)
        service.ingest_all([report])
        yield service


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasserelleProcess]:
    """End to end: a running service that received the synthetic CT slice over DICOM."""
    with PasserelleProcess(tmp_path_factory.mktemp("render-e2e") / "data") as server:
        assert send(server.dicom_port, _ct())[0] == 0x0000
        yield server


_CT_STUDY, _CT_SERIES = generate_uid(), generate_uid()


def _ct(**attributes: object) -> Dataset:
    sop = "1.2.3.4.100" if "SOPClassUID" not in attributes else "1.2.3.4.200"
    return ct_slice(_CT_STUDY, _CT_SERIES, 1, 1, size=64, sop_uid=sop, BitsStored=16,
                    HighBit=15, **attributes)


def url(server: InProcessService, ds: Dataset, suffix: str = "/rendered") -> str:
    return (f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{suffix}")


def png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(BytesIO(response.content)))


def oracle_gray(ds: Dataset, frame: np.ndarray, center: float | None = None,
                width: float | None = None, top: int = 255) -> np.ndarray:
    """pydicom's Modality LUT then windowing, VOI LUT or min/max (in that order of
    preference), rescaled from its output range to 0..top, inverted for MONOCHROME1."""
    values = apply_modality_lut(frame, ds)
    if center is not None:
        ds = copy.deepcopy(ds)  # Dataset.copy() is shallow: it would change the caller's
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.VOILUTFunction = "LINEAR"
    if "WindowCenter" in ds:
        out = apply_windowing(values, ds)
        bits = ds.BitsStored
        low = 0 if ds.PixelRepresentation == 0 else -(1 << (bits - 1))
        high = low + (1 << bits) - 1
        if "ModalityLUTSequence" not in ds:
            slope = float(ds.get("RescaleSlope", 1))
            intercept = float(ds.get("RescaleIntercept", 0))
            low, high = low * slope + intercept, high * slope + intercept
        result = np.rint((out - low) / (high - low) * top)
    elif "VOILUTSequence" in ds:
        out = apply_voi_lut(values, ds, prefer_lut=True).astype(float)
        result = np.rint(out * top / (2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1))
    else:
        values = values.astype(float)
        result = np.rint((values - values.min()) / (values.max() - values.min()) * top)
    return top - result if ds.PhotometricInterpretation == "MONOCHROME1" else result


def test_ct_window_from_the_instance_and_from_the_request(imaging: InProcessService) -> None:
    ds = _ct()
    got = png(imaging.get(url(imaging, ds), headers={"Accept": "image/png"}))
    assert np.abs(got.astype(int) - oracle_gray(ds, ds.pixel_array)).max() <= 1
    got = png(imaging.get(url(imaging, ds), params={"window": "300,1500"},
                          headers={"Accept": "image/png"}))
    assert np.abs(got.astype(int) - oracle_gray(ds, ds.pixel_array, 300, 1500)).max() <= 1


def test_monochrome1_is_inverted(imaging: InProcessService) -> None:
    ds = dcmread(sample("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    got = png(imaging.get(url(imaging, ds), headers={"Accept": "image/png"}))
    expected = oracle_gray(ds, ds.pixel_array)
    assert np.abs(got.astype(int) - expected).max() <= 1
    # Dark where the stored values are high: the inversion really happened.
    bright = ds.pixel_array > np.percentile(ds.pixel_array, 99)
    assert got[bright].mean() < 64


def test_palette_colour(imaging: InProcessService) -> None:
    ds = dcmread(sample("OBXXXX1A.dcm"))
    got = png(imaging.get(url(imaging, ds), headers={"Accept": "image/png"}))
    rgb = apply_color_lut(ds.pixel_array, ds)
    expected = rgb >> 8 if rgb.dtype == np.uint16 else rgb
    assert np.array_equal(got, expected.astype(np.uint8))


def test_rgb_exact_in_png_and_close_in_jpeg(imaging: InProcessService) -> None:
    ds = dcmread(sample("SC_rgb.dcm"))
    assert np.array_equal(png(imaging.get(url(imaging, ds), headers={"Accept": "image/png"})),
                          ds.pixel_array)
    jpeg = imaging.get(url(imaging, ds))
    assert jpeg.headers["content-type"] == "image/jpeg"
    decoded = np.asarray(Image.open(BytesIO(jpeg.content))).astype(int)
    assert np.abs(decoded - ds.pixel_array).mean() < 3


# Grayscale cases: codec, signedness, LUTs, byte order (PNG output, compared with the oracle).
GRAY = ["MR_small_jpeg_ls_lossless.dcm", "693_J2KR.dcm", "vlut_04.dcm", "mlut_18.dcm",
        "MR_small.dcm", "CT_small.dcm", "JPEG-LL.dcm", "JPGExtended.dcm",
        "emri_small_jpeg_ls_lossless.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm",
        "RG1_J2KR.dcm", "emri_small_jpeg_2k_lossless.dcm"]
# Colour cases: (file, the same picture stored uncompressed as RGB, largest difference to it).
COLOUR = [
    ("SC_ybr_full_uncompressed.dcm", "SC_rgb.dcm", 6),          # YBR_FULL
    ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb.dcm", 6),      # YBR_FULL_422, native
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb.dcm", 6),            # YBR_FULL_422, JPEG baseline
    ("US1_J2KR.dcm", "US1_UNCR.dcm", 0),                        # YBR_RCT, JPEG 2000 lossless
    ("US1_J2KI.dcm", "US1_UNCI.dcm", 0),                        # YBR_ICT, JPEG 2000
    ("color-pl.dcm", "color-px.dcm", 0),                        # planar configuration 1
    ("SC_rgb_rle_16bit.dcm", "SC_rgb_16bit.dcm", 0),            # 16-bit RGB, RLE
]


@pytest.mark.parametrize("name", GRAY)
def test_grayscale_against_the_oracle(imaging: InProcessService, name: str) -> None:
    ds = stored(name)
    frame = ds.pixel_array[0] if int(ds.get("NumberOfFrames") or 1) > 1 else ds.pixel_array
    got = png(imaging.get(url(imaging, ds, "/frames/1/rendered"),
                          headers={"Accept": "image/png"}))
    assert np.abs(got.astype(int) - oracle_gray(ds, frame)).max() <= 1


@pytest.mark.parametrize("name, reference, tolerance", COLOUR)
def test_colour_against_the_oracle(imaging: InProcessService, name: str, reference: str,
                                   tolerance: int) -> None:
    ds = stored(name)
    got = png(imaging.get(url(imaging, ds), headers={"Accept": "image/png"})).astype(int)
    shift = ds.BitsStored - 8
    # Exactly pydicom's decoding and colour conversion ...
    assert np.array_equal(got, ds.pixel_array.astype(int) >> shift)
    # ... which is the picture stored uncompressed in RGB.
    expected = stored(reference).pixel_array.astype(int) >> shift
    assert np.abs(got - expected).max() <= tolerance


def _synthetic(**attributes: object) -> Dataset:
    return ct_slice(_CT_STUDY, _CT_SERIES, 1, 2, size=64, **attributes)


_GARBAGE = _synthetic(sop_uid="1.2.3.4.300")  # BitsStored 12, the 4 high bits set at random
_CLEAN = _GARBAGE.pixel_array.copy()
_GARBAGE.PixelData = (_CLEAN | (np.random.default_rng(7).integers(0, 16, _CLEAN.shape,
                                                                     dtype=np.uint16) << 12)
                      ).tobytes()
_SIGMOID = _synthetic(sop_uid="1.2.3.4.301", VOILUTFunction="SIGMOID")
_INVERSE = _synthetic(sop_uid="1.2.3.4.302", PresentationLUTShape="INVERSE")
SYNTHETIC = [_GARBAGE, _SIGMOID, _INVERSE]


def test_high_bits_above_bits_stored_are_masked(imaging: InProcessService) -> None:
    got = png(imaging.get(url(imaging, _GARBAGE), headers={"Accept": "image/png"}))
    assert np.abs(got.astype(int) - oracle_gray(_GARBAGE, _CLEAN)).max() <= 1


def test_sigmoid_voi_function(imaging: InProcessService) -> None:
    got = png(imaging.get(url(imaging, _SIGMOID), headers={"Accept": "image/png"}))
    assert np.abs(got.astype(int) - oracle_gray(_SIGMOID, _SIGMOID.pixel_array)).max() <= 1


def test_presentation_lut_inverse(imaging: InProcessService) -> None:
    got = png(imaging.get(url(imaging, _INVERSE), headers={"Accept": "image/png"}))
    expected = 255 - oracle_gray(_INVERSE, _INVERSE.pixel_array)
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_sixteen_bit_png(imaging: InProcessService) -> None:
    ds = _ct()
    got = png(imaging.get(url(imaging, ds), params={"bitdepth": "16"},
                          headers={"Accept": "image/png"}))
    assert got.dtype.itemsize == 2 or got.max() > 255
    assert np.abs(got.astype(int) - oracle_gray(ds, ds.pixel_array, top=65535)).max() <= 1


def test_dicomweb_client_rendered(running: PasserelleProcess) -> None:
    """End to end: dicomweb-client over a socket, on a slice received over DICOM."""
    client = DICOMwebClient(f"{running.base_url}/dicom-web")
    ds = _ct()
    jpeg = client.retrieve_instance_rendered(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                             ds.SOPInstanceUID, media_types=("image/jpeg",))
    assert Image.open(BytesIO(jpeg)).size == (64, 64)
    frame = client.retrieve_instance_frames_rendered(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [1],
        media_types=("image/png",), params={"window": "300,1500"})
    got = np.asarray(Image.open(BytesIO(frame))).astype(int)
    assert np.abs(got - oracle_gray(ds, ds.pixel_array, 300, 1500)).max() <= 1


def test_multiframe_rendered_is_multipart(imaging: InProcessService) -> None:
    ds = dcmread(sample("emri_small_RLE.dcm"))
    response = imaging.get(url(imaging, ds))
    assert response.status_code == 200
    assert 'type="image/jpeg"' in response.headers["content-type"]
    parts = parts_of(response)
    assert len(parts) == int(ds.NumberOfFrames)
    assert all(Image.open(BytesIO(body)).format == "JPEG" for _, body in parts)
    one = imaging.get(url(imaging, ds, "/frames/3/rendered"), headers={"Accept": "image/png"})
    assert png(one).shape == (ds.Rows, ds.Columns)


def test_viewport_keeps_the_aspect(imaging: InProcessService) -> None:
    ds = dcmread(sample("SC_rgb.dcm"))
    image = Image.open(BytesIO(imaging.get(url(imaging, ds),
                                           params={"viewport": "50,20"}).content))
    assert image.size[0] <= 50 and image.size[1] <= 20
    assert max(image.size) in (50, 20)


def test_wado_uri(running: PasserelleProcess) -> None:
    """End to end: WADO-URI over a socket, on a slice received over DICOM."""
    ds = _ct()
    base = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID}
    jpeg = httpx.get(f"{running.base_url}/wado", params=base)
    assert jpeg.headers["content-type"] == "image/jpeg"
    got = png(httpx.get(f"{running.base_url}/wado", params={
        **base, "contentType": "image/png", "windowCenter": "300", "windowWidth": "1500"}))
    assert np.abs(got.astype(int) - oracle_gray(ds, ds.pixel_array, 300, 1500)).max() <= 1
    small = png(httpx.get(f"{running.base_url}/wado", params={
        **base, "contentType": "image/png", "rows": "32", "columns": "32",
        "region": "0,0,0.5,0.5"}))
    assert small.shape == (32, 32)
    gif = httpx.get(f"{running.base_url}/wado", params={**base, "contentType": "image/gif"})
    assert Image.open(BytesIO(gif.content)).format == "GIF"
    dicom = httpx.get(f"{running.base_url}/wado", params={**base,
                                                          "contentType": "application/dicom"})
    assert dicom.headers["content-type"] == "application/dicom"
    assert dcmread(BytesIO(dicom.content)).SOPInstanceUID == ds.SOPInstanceUID


def test_wado_uri_anonymize(imaging: InProcessService) -> None:
    ds = _ct()
    query = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
             "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID,
             "contentType": "application/dicom", "anonymize": "yes"}
    first = dcmread(BytesIO(imaging.get(f"{imaging.base_url}/wado", params=query).content))
    assert first.PatientIdentityRemoved == "YES"
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "ReferringPhysicianName"):
        assert not first.get(keyword), keyword
    assert first.PatientBirthDate != ds.PatientBirthDate
    assert first.StudyInstanceUID != ds.StudyInstanceUID
    assert first.SOPInstanceUID != ds.SOPInstanceUID
    assert np.array_equal(first.pixel_array, ds.pixel_array)
    again = dcmread(BytesIO(imaging.get(f"{imaging.base_url}/wado", params=query).content))
    assert again.StudyInstanceUID == first.StudyInstanceUID  # stable across requests
    key = imaging.data_dir / "deidentify.key"
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("path, params, headers, status, message", [
    ("sr", {}, {}, 422, "no SR document content"),
    ("ct", {"window": "40"}, {}, 400, "window takes 2"),
    ("ct", {"window": "40,400,cubic"}, {}, 400, "window function"),
    ("ct", {"viewport": "0,10"}, {}, 400, "viewport sizes"),
    ("ct", {"quality": "101"}, {}, 400, "quality must be"),
    ("ct", {}, {"Accept": "application/json"}, 406, "image/jpeg"),
    ("ct-frame-9", {}, {}, 404, "1 frame"),
    ("ct", {"viewport": "8000,8000"}, {}, 400, "max_output_pixels"),
])
def test_rendered_errors(imaging: InProcessService, path: str, params: dict, headers: dict,
                         status: int, message: str) -> None:
    ds = _ct() if path != "sr" else _ct(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11")
    suffix = "/frames/9/rendered" if path == "ct-frame-9" else "/rendered"
    response = imaging.get(url(imaging, ds, suffix), params=params, headers=headers)
    assert response.status_code == status
    assert message in response.text


@pytest.mark.parametrize("params, status, message", [
    ({}, 400, "requestType must be WADO"),
    ({"requestType": "WADO", "studyUID": "1.2", "seriesUID": "x", "objectUID": "1.3"}, 400,
     "seriesUID must be a valid UID"),
    ({"requestType": "WADO", "studyUID": "1.2", "seriesUID": "1.3", "objectUID": "1.4"}, 404,
     "no such object"),
    ({"contentType": "text/html"}, 406, "text/html not offered"),
    ({"region": "0.5,0,0.2,1"}, 400, "region is"),
    ({"anonymize": "yes"}, 400, "anonymize=yes applies to contentType=application/dicom"),
    ({"anonymize": "maybe", "contentType": "application/dicom"}, 400, "anonymize must be"),
    ({"rows": "8000", "columns": "8000"}, 400, "max_output_pixels"),
])
def test_wado_uri_errors(imaging: InProcessService, params: dict, status: int,
                         message: str) -> None:
    ds = _ct()
    base = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID}
    query = params if "requestType" in params or not params else {**base, **params}
    response = imaging.get(f"{imaging.base_url}/wado", params=query)
    assert response.status_code == status
    assert message in response.text
