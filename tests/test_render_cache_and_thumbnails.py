"""Render cache (LRU on disk, single flight), thumbnails, study/series rendered resources and
viewport source rectangles: in-process, but for the cache across a restart of a running
service."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from tests.conftest import _local_test_files
from tests.inprocess import InProcessService
from tests.multipart import parts_of
from tests.processes import PasserelleProcess
from tests.scu import send
from tests.synthetic import ct_slice

STUDY = generate_uid()
SERIES = [generate_uid(), generate_uid()]
CACHE_BYTES = 300_000


def _flat(series: int, number: int, value: int, size: int = 64) -> Dataset:
    """A slice of one constant value, so that which slice was rendered is visible."""
    ds = ct_slice(STUDY, SERIES[series - 1], series, number, size=size,
                  RescaleIntercept=0, WindowCenter=2048, WindowWidth=4096)
    ds.PixelData = np.full((size, size), value, dtype=np.uint16).tobytes()
    return ds


# Series 2 is sent first: "first series" means the lowest Series Number, not arrival order.
SLICES = [_flat(2, 1, 4000), *(_flat(1, n, 1000 * n) for n in (1, 2, 3))]
BIG = ct_slice(STUDY, SERIES[1], 2, 2, size=512)
MULTIFRAME = next(p for p in _local_test_files() if p.name == "emri_small.dcm")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessService]:
    with InProcessService(tmp_path_factory.mktemp("cache") / "data",
                          render_cache_bytes=str(CACHE_BYTES)) as web:
        web.ingest_all([*SLICES, BIG, MULTIFRAME])
        yield web


@pytest.fixture
def running(tmp_path: Path) -> Iterator[PasserelleProcess]:
    """A running service that received BIG over DICOM."""
    with PasserelleProcess(tmp_path / "data", render_cache_bytes=str(CACHE_BYTES)) as server:
        assert send(server.dicom_port, BIG)[0] == 0x0000
        yield server


def _url(server: InProcessService | PasserelleProcess, ds: Dataset, suffix: str) -> str:
    return (f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{suffix}")


def _gray(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(BytesIO(response.content)).convert("L")).astype(int)


def _cache_files(server: InProcessService | PasserelleProcess) -> list[Path]:
    return [p for p in (server.data_dir / "cache" / "rendered").glob("*/*") if p.is_file()]


def test_thumbnails_show_the_middle_of_the_first_series(service: InProcessService) -> None:
    middle = SLICES[2]  # series 1, instance 2 of 3
    expected = _gray(service.get(_url(service, middle, "/rendered"),
                                 params={"viewport": "128,128"}, headers={"Accept": "image/png"}))
    study = service.get(f"/dicom-web/studies/{STUDY}/thumbnail",
                        headers={"Accept": "image/png"})
    assert np.array_equal(_gray(study), expected)
    assert study.headers["content-type"] == "image/png"
    series = service.get(f"/dicom-web/studies/{STUDY}/series/{SERIES[0]}"
                         "/thumbnail", headers={"Accept": "image/png"})
    assert np.array_equal(_gray(series), expected)
    jpeg = service.get(_url(service, middle, "/thumbnail"), params={"viewport": "32,32"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(BytesIO(jpeg.content)).size == (32, 32)


def test_multiframe_thumbnail_is_its_middle_frame(service: InProcessService) -> None:
    ds = dcmread(MULTIFRAME, stop_before_pixels=True)
    middle = (int(ds.NumberOfFrames) + 1) // 2
    expected = _gray(service.get(_url(service, ds, f"/frames/{middle}/rendered"),
                                 params={"viewport": "128,128"}, headers={"Accept": "image/png"}))
    got = _gray(service.get(_url(service, ds, "/thumbnail"), headers={"Accept": "image/png"}))
    assert np.array_equal(got, expected)


def test_study_and_series_rendered_are_every_frame(service: InProcessService) -> None:
    response = service.get(f"/dicom-web/studies/{STUDY}/series/{SERIES[0]}"
                           "/rendered", headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert 'multipart/related; type="image/png"' in response.headers["content-type"]
    means = [np.asarray(Image.open(BytesIO(body))).mean() for _, body in parts_of(response)]
    assert len(means) == 3 and means == sorted(means)  # instance order, values 1000..3000
    study = service.get(f"/dicom-web/studies/{STUDY}/rendered")
    assert len(parts_of(study)) == 5


def test_viewport_source_rectangle_and_flip(service: InProcessService) -> None:
    ds = BIG
    full = _gray(service.get(_url(service, ds, "/rendered"), headers={"Accept": "image/png"}))
    part = _gray(service.get(_url(service, ds, "/rendered"), headers={"Accept": "image/png"},
                             params={"viewport": "100,50,10,20,100,-50"}))
    assert np.array_equal(part, full[20:70, 10:110][::-1])
    outside = service.get(_url(service, ds, "/rendered"), params={"viewport": "10,10,600,0,5,5"})
    assert outside.status_code == 422 and "outside" in outside.text


def test_second_request_is_served_from_the_cache(service: InProcessService) -> None:
    ds = SLICES[1]
    before = service.metric("passerelle_render_cache_total", result="hit")
    first = service.get(_url(service, ds, "/rendered"), params={"quality": "61"})
    second = service.get(_url(service, ds, "/rendered"), params={"quality": "61"})
    assert first.content == second.content
    assert first.headers["etag"] == second.headers["etag"]
    assert service.metric("passerelle_render_cache_total", result="hit") == before + 1
    unchanged = service.get(_url(service, ds, "/rendered"), params={"quality": "61"},
                            headers={"If-None-Match": first.headers["etag"]})
    assert unchanged.status_code == 304
    other = service.get(_url(service, ds, "/rendered"), params={"quality": "62"})
    assert other.headers["etag"] != first.headers["etag"]


def test_concurrent_identical_requests_render_once(service: InProcessService) -> None:
    ds = BIG
    misses = service.metric("passerelle_render_cache_total", result="miss")
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda _: service.get(_url(service, ds, "/rendered"),
                                                     params={"quality": "37"}).content, range(8)))
    assert len(set(bodies)) == 1
    assert service.metric("passerelle_render_cache_total", result="miss") == misses + 1


def test_cache_stays_within_its_size_and_survives_restart(running: PasserelleProcess) -> None:
    """End to end: the bound and the restart are the process's."""
    service, ds = running, BIG
    for size in range(100, 420, 10):  # ~32 renderings of 10-60 KB each: more than the bound
        assert httpx.get(_url(service, ds, "/rendered"), params={"viewport": f"{size},{size}"}
                         ).status_code == 200
    total = sum(p.stat().st_size for p in _cache_files(service))
    assert 0 < total <= CACHE_BYTES
    service.stop()
    service.start()
    hits = service.metric("passerelle_render_cache_total", result="hit")
    assert hits == 0
    assert httpx.get(_url(service, ds, "/rendered"), params={"viewport": "410,410"}
                     ).status_code == 200
    assert service.metric("passerelle_render_cache_total", result="hit") == 1


@pytest.mark.parametrize("path, status, message", [
    ("/studies/1.2.3/thumbnail", 404, "no such study"),
    ("/studies/{study}/series/1.2.3/rendered", 404, "no such series"),
    ("/studies/{study}/thumbnail?viewport=a,b", 400, "viewport"),
    ("/studies/{study}/rendered?bitdepth=16", 400, "bitdepth=16 needs image/png"),
    ("/studies/{study}/rendered?bitdepth=12", 400, "bitdepth must be"),
])
def test_errors(service: InProcessService, path: str, status: int, message: str) -> None:
    response = service.get(f"/dicom-web{path.format(study=STUDY)}")
    assert response.status_code == status
    assert message in response.text
