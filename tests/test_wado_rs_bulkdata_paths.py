"""Bulk data inside sequences (PS3.18 10.4.1.1.5, Annex F.2.6): each BulkDataURI of the
metadata names its element by its whole path and serves that element's bytes; the path is
outside input, checked, and the manifest scope holds for it as for a top-level tag."""

from collections.abc import Callable

import httpx
import pytest
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless, generate_uid

from tests.inprocess import InProcessService
from tests.multipart import parts_of
from tests.synthetic import ct_slice
from tests.test_access_model import publish

ICON = bytes(range(256)) * 4  # 32 x 32, 8 bits: over the inline threshold
DEEP_ICON = bytes(reversed(range(256))) * 4
JSON = {"Accept": "application/dicom+json"}


def _icon(pixels: bytes) -> Dataset:
    icon = Dataset()
    icon.Rows = icon.Columns = 32
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = pixels
    return icon


def _with_icons() -> Dataset:
    """A CT slice with an icon (IconImageSequence > PixelData) and, two sequences down, the
    icon of its second referenced image."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=16)
    ds.IconImageSequence = Sequence([_icon(ICON)])
    first, second = Dataset(), Dataset()
    for item in (first, second):
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, generate_uid()
    second.IconImageSequence = Sequence([_icon(DEEP_ICON)])
    ds.ReferencedImageSequence = Sequence([first, second])
    return ds


@pytest.fixture
def stored(web: InProcessService) -> tuple[InProcessService, Dataset, str]:
    ds = _with_icons()
    assert web.ingest(ds).accepted
    url = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")
    return web, ds, url


def _value(web: InProcessService, uri: str, **headers: str) -> bytes:
    response = web.get(uri, headers=headers)
    assert response.status_code == 200, response.text
    [(_, value)] = parts_of(response)
    return value


def test_each_bulk_data_uri_serves_its_own_element(
        stored: tuple[InProcessService, Dataset, str]) -> None:
    web, ds, url = stored
    [item] = web.get(f"{url}/metadata", headers=JSON).json()
    icon_uri = item["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    deep_uri = item["00081140"]["Value"][1]["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert icon_uri == f"{web.base_url}{url}/bulkdata/00880200/1/7FE00010"
    assert deep_uri == f"{web.base_url}{url}/bulkdata/00081140/2/00880200/1/7FE00010"
    assert item["7FE00010"]["BulkDataURI"] == f"{web.base_url}{url}/bulkdata/7FE00010"
    assert _value(web, icon_uri) == ICON
    assert _value(web, deep_uri) == DEEP_ICON
    [(_, top)] = parts_of(web.get(item["7FE00010"]["BulkDataURI"],
                                  headers={"Accept": "multipart/related; "
                                           "type=application/octet-stream"}))
    assert top == ds.PixelData


@pytest.mark.parametrize("suffix, status, message", [
    ("00880200/2/7FE00010", 404, "sequence 00880200 has 1 item(s), not 2"),
    ("00081140/1/00880200/1/7FE00010", 404, "no sequence 00081140/1/00880200"),
    ("00100010/1/7FE00010", 404, "no sequence 00100010"),
    ("00081140/1/00081155", 404, "no binary value 00081140/1/00081155"),
    ("00880200/0/7FE00010", 400, "item number must be a number from 1"),
    ("00880200/x/7FE00010", 400, "item number must be a number from 1"),
    ("00880200/99999999999/7FE00010", 400, "item number must be a number from 1"),
    ("00880200/1", 400, "must alternate tags and item numbers"),
    ("00880200/1/zz", 400, "8 hexadecimal digits"),
    # One URL per element (one entry in a cache): its tags and numbers spelled one way.
    ("00880200/01/7FE00010", 400, "without leading zeros"),
    ("00880200/+1/7FE00010", 400, "without leading zeros"),
    ("0000000000880200/1/00007FE00010", 400, "8 hexadecimal digits"),
    ("0880200/1/7FE00010", 400, "8 hexadecimal digits"),
    ("/".join(["00880200/1"] * 101) + "/7FE00010", 400, "more than 100 sequences"),
])
def test_a_path_that_names_nothing_is_refused_clearly(
        stored: tuple[InProcessService, Dataset, str], suffix: str, status: int,
        message: str) -> None:
    web, _, url = stored
    response = web.get(f"{url}/bulkdata/{suffix}")
    assert (response.status_code, message in response.text) == (status, True), response.text


def test_the_manifest_scope_holds_for_nested_paths(
        make_web: Callable[..., InProcessService]) -> None:
    web = make_web()
    referenced, late = _with_icons(), _with_icons()
    late.StudyInstanceUID, late.SeriesInstanceUID = (referenced.StudyInstanceUID,
                                                     referenced.SeriesInstanceUID)
    assert web.ingest(referenced).accepted
    kos = publish(web, referenced.StudyInstanceUID)
    assert web.ingest(late).accepted  # after the publication: not in the manifest
    series = (f"/dicom-web/studies/{referenced.StudyInstanceUID}/series/"
              f"{referenced.SeriesInstanceUID}")

    def get(ds: Dataset, kos_uid: str) -> httpx.Response:
        return web.get(f"{series}/instances/{ds.SOPInstanceUID}/bulkdata/00880200/1/7FE00010",
                       headers={"KOS-SOPInstanceUID": kos_uid})

    assert parts_of(get(referenced, kos))[0][1] == ICON
    assert get(late, kos).status_code == 403
    assert get(referenced, generate_uid()).status_code == 403


def test_metadata_cached_by_an_earlier_version_is_made_again(
        stored: tuple[InProcessService, Dataset, str]) -> None:
    """JSON cached before the URIs named nested elements by their path (the icon's pointed at
    the top-level Pixel Data) is not served: it is computed again."""
    web, ds, url = stored
    old = ('{"00880200":{"vr":"SQ","Value":[{"7FE00010":{"vr":"OB","BulkDataURI":'
           f'"urn:passerelle:dicomweb-root{url.removeprefix("/dicom-web")}/bulkdata/7FE00010"'
           '}}]}}')
    web.store.index.cache_metadata([(ds.SOPInstanceUID, old)])
    [item] = web.get(f"{url}/metadata", headers=JSON).json()
    icon_uri = item["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert icon_uri == f"{web.base_url}{url}/bulkdata/00880200/1/7FE00010"
    assert _value(web, icon_uri) == ICON


def test_nested_encapsulated_pixel_data_is_refused_clearly(web: InProcessService) -> None:
    """The icon of a compressed object is encapsulated too (PS3.5 A.4): its fragments are
    no octet-stream value, so the path is refused with a reason, not served raw."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=16)
    ds.compress(RLELossless)
    icon = _icon(b"")
    icon.PixelData = encapsulate([ICON])
    icon["PixelData"].is_undefined_length = True
    ds.IconImageSequence = Sequence([icon])
    assert web.ingest(ds).accepted
    url = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}/bulkdata/00880200/1/7FE00010")
    response = web.get(url)
    assert response.status_code == 422, response.text
    assert "encapsulated pixel data" in response.text


def test_patient_text_like_the_url_placeholder_is_left_alone(web: InProcessService) -> None:
    """Only bulk data URIs get the base URL, and only their old form makes a cached text
    stale: a description holding either placeholder is served as stored, from the cache."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    ds.StudyDescription = '"urn:passerelle:dicomweb-root/x'
    ds.SeriesDescription = '"urn:passerelle:dicomweb-root:2/studies/evil'
    assert web.ingest(ds).accepted
    cached: list[int] = []
    cache = web.store.index.cache_metadata

    def counting(rows: list[tuple[str, str]]) -> None:
        cached.append(len(rows))
        cache(rows)

    web.store.index.cache_metadata = counting  # type: ignore[method-assign]
    url = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}/metadata")
    for _ in range(3):
        [item] = web.get(url, headers=JSON).json()
        assert item["00081030"]["Value"] == [ds.StudyDescription]
        assert item["0008103E"]["Value"] == [ds.SeriesDescription]
    assert cached == [1]
