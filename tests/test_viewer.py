"""The OHIF viewer at /viewer/ in a real headless Chromium (tests/browser.py) against a running
``passerelle serve``: every kind of image the gateway stores is drawn, read back from the
viewport's own canvas; lossless encodings of one image draw the same pixels as its
uncompressed copy; the console's link opens a study; the files are served from their folder
only, with their caches and gzip copies.

The viewer is the one ``scripts/setup.sh`` installs (``viewer/``, the pinned ``@ohif/app``).
"""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser import chromium, ohif_notice_acknowledged
from tests.conftest import _local_test_files
from tests.processes import REPO, PasserelleProcess
from tests.scu import send
from tests.synthetic import ct_slice

VIEWER = REPO / "viewer"

# pydicom's and pydicom-data's files: (name, colour) for each kind the issue lists.
KINDS = {
    "MR": ("MR_small.dcm", False),
    "RGB": ("SC_rgb.dcm", True),
    "YBR_FULL": ("SC_ybr_full_uncompressed.dcm", True),
    "RLE colour": ("SC_rgb_rle.dcm", True),
    "JPEG baseline colour": ("SC_rgb_jpeg_dcmtk.dcm", True),
    "JPEG extended": ("JPGExtended.dcm", False),
    "JPEG lossless": ("JPEG-LL.dcm", False),
    "JPEG-LS lossless": ("MR_small_jpeg_ls_lossless.dcm", False),
    "JPEG 2000 lossless": ("MR_small_jp2klossless.dcm", False),
    "JPEG 2000 colour (YBR_RCT)": ("US1_J2KR.dcm", True),
    "multi-frame enhanced MR": ("emri_small.dcm", False),
    "multi-frame JPEG YBR_FULL_422 ultrasound": ("examples_ybr_color.dcm", True),
}
# Encodings of one image that must draw the same pixels.
SAME_PIXELS = [("MR", "JPEG-LS lossless", "JPEG 2000 lossless"),
               ("RGB", "RLE colour", "YBR_FULL")]

# The viewport's own pixels (OHIF draws each viewport into a 2D canvas), not a screenshot:
# overlays and text are not in it.
_CANVAS_STATISTICS = """
const canvas = document.querySelector('canvas.cornerstone-canvas');
const context = canvas && canvas.getContext('2d');
if (!context || !canvas.width) return null;
const {data} = context.getImageData(0, 0, canvas.width, canvas.height);
let lit = 0, colour = 0, sum = 0, squares = 0;
for (let i = 0; i < data.length; i += 4) {
  const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
  const y = (r + g + b) / 3;
  sum += y; squares += y * y;
  if (y > 16) lit++;
  if (Math.max(r, g, b) - Math.min(r, g, b) > 40) colour++;
}
const n = data.length / 4, mean = sum / n;
return {width: canvas.width, height: canvas.height, lit: lit / n, colour: colour / n, mean: mean,
        std: Math.sqrt(Math.max(squares / n - mean * mean, 0))};
"""


def _colour_share(source: Path, width: int, height: int) -> float:
    """The share of a ``width`` x ``height`` viewport that ``source``'s first frame, decoded by
    pydicom and fitted in it, covers in colour (channels more than 40 apart)."""
    ds = dcmread(source)
    pixels = ds.pixel_array[0] if ds.get("NumberOfFrames", 1) > 1 else ds.pixel_array
    spread = pixels.max(axis=2).astype(int) - pixels.min(axis=2)
    scale = min(width / ds.Columns, height / ds.Rows)
    return float((spread > 40).mean()) * ds.Columns * ds.Rows * scale ** 2 / (width * height)


def _copy(source: Path, folder: Path) -> tuple[str, Path]:
    """``source`` under new UIDs (a study of its own), pixel data untouched."""
    ds = dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = source.stem[:16]
    path = folder / source.name
    ds.save_as(path, enforce_file_format=True)
    return ds.StudyInstanceUID, path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasserelleProcess]:
    assert (VIEWER / "VERSION").is_file(), "the viewer is not installed: ./scripts/setup.sh"
    folder = tmp_path_factory.mktemp("viewer")
    with PasserelleProcess(folder / "data", viewer_dir=str(VIEWER), http_workers="1",
                           dicom_receivers="1") as process:
        yield process


@pytest.fixture(scope="module")
def studies(server: PasserelleProcess, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, str]:
    """Study UID of each kind, stored."""
    files = {path.name: path for path in _local_test_files()}
    folder = tmp_path_factory.mktemp("kinds")
    uids = {}
    for kind, (name, _) in KINDS.items():
        uids[kind], path = _copy(files[name], folder)
        assert send(server.dicom_port, path)[0] == 0, kind
    return uids


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium("fr") as driver:
        ohif_notice_acknowledged(driver)
        yield driver


def test_the_viewer_says_once_it_is_for_investigational_use(
        server: PasserelleProcess) -> None:
    with chromium("en") as driver:
        driver.get(f"{server.base_url}/viewer/")
        confirm = "[data-cy='confirm-and-hide-button']"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not driver.find_elements(By.CSS_SELECTOR,
                                                                       confirm):
            time.sleep(0.2)
        assert "investigational use" in driver.find_element(By.TAG_NAME, "body").text
        driver.find_element(By.CSS_SELECTOR, confirm).click()
        driver.refresh()
        time.sleep(3)
        assert not driver.find_elements(By.CSS_SELECTOR, confirm)  # remembered


def _drawn(driver: WebDriver, seconds: float = 60) -> dict[str, float]:
    """The viewport's pixel statistics once an image is drawn and stays the same."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        now = driver.execute_script(_CANVAS_STATISTICS)
        if now and now["std"] > 1 and now == last:
            return now
        last = now
        time.sleep(0.5)
    raise AssertionError(f"no image drawn on {driver.current_url}: {last}")


def _open(driver: WebDriver, server: PasserelleProcess, study_uid: str) -> dict[str, float]:
    driver.get(f"{server.base_url}/viewer/viewer?StudyInstanceUIDs={study_uid}")
    return _drawn(driver)


@pytest.fixture(scope="module")
def drawn(server: PasserelleProcess, studies: dict[str, str], browser: WebDriver
          ) -> dict[str, dict[str, float]]:
    """The pixel statistics of each kind, as the viewer draws it."""
    return {kind: _open(browser, server, uid) for kind, uid in studies.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_the_viewer_draws_each_kind_of_image(kind: str, drawn: dict[str, dict[str, float]]
                                             ) -> None:
    pixels = drawn[kind]
    assert pixels["lit"] > 0.02 and pixels["std"] > 5, pixels  # an image, not a blank
    name, colour = KINDS[kind]
    if colour:  # as much of it in colour as pydicom decodes (an independent decoder)
        source = next(path for path in _local_test_files() if path.name == name)
        expected = _colour_share(source, int(pixels["width"]), int(pixels["height"]))
        assert pixels["colour"] > 0, pixels
        assert pixels["colour"] == pytest.approx(expected, rel=0.15, abs=0.002), pixels
    else:
        assert pixels["colour"] == 0, pixels  # grey stays grey


@pytest.mark.parametrize("kinds", SAME_PIXELS, ids=" = ".join)
def test_lossless_encodings_of_one_image_draw_the_same_pixels(
        kinds: tuple[str, ...], drawn: dict[str, dict[str, float]]) -> None:
    first = drawn[kinds[0]]
    for other in kinds[1:]:
        assert drawn[other] == pytest.approx(first, abs=0.5), other


def test_the_console_link_opens_a_multi_series_ct_in_the_viewer(
        server: PasserelleProcess, browser: WebDriver) -> None:
    study = generate_uid()
    for series_number in (1, 2):
        series = generate_uid()
        for number in range(1, 6):
            slice_ = ct_slice(study, series, series_number, number, size=128)
            assert send(server.dicom_port, slice_)[0] == 0
    browser.get(f"{server.base_url}/ui/studies/{study}")
    browser.find_element(By.ID, "open-viewer").click()
    assert browser.current_url.startswith(f"{server.base_url}/viewer/viewer?")
    assert _drawn(browser)["lit"] > 0.02
    # Both series are in the viewer's study browser, as thumbnails.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(browser.find_elements(
            By.CSS_SELECTOR, "[data-cy='study-browser-thumbnail']")) < 2:
        time.sleep(0.5)
    assert len(browser.find_elements(By.CSS_SELECTOR,
                                     "[data-cy='study-browser-thumbnail']")) == 2


def test_the_studies_list_links_each_study_to_the_viewer(
        server: PasserelleProcess, studies: dict[str, str]) -> None:
    page = httpx.get(f"{server.base_url}/ui/").text
    assert f'href="/viewer/viewer?StudyInstanceUIDs={studies["MR"]}"' in page


def test_the_viewer_reads_this_gateways_dicomweb(server: PasserelleProcess) -> None:
    config = httpx.get(f"{server.base_url}/viewer/app-config.js")
    assert config.status_code == 200 and "javascript" in config.headers["content-type"]
    assert 'root + "/dicom-web"' in config.text and "window.location.origin" in config.text
    assert '"routerBasename": "/viewer"' in config.text


def test_the_viewer_routes_answer_its_page_with_a_content_security_policy(
        server: PasserelleProcess) -> None:
    for path in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3", "/viewer/localbasic",
                 "/viewer/index.html"):
        page = httpx.get(f"{server.base_url}{path}")
        assert page.status_code == 200 and '<div id="root"' in page.text, path
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "'unsafe-inline'" not in \
            policy.split("script-src")[1].split(";")[0]
        assert page.headers["cache-control"] == "no-cache"
    assert httpx.get(f"{server.base_url}/viewer").headers["location"] == "/viewer/"


def test_the_viewer_files_are_cached_by_their_hash_and_sent_gzipped(
        server: PasserelleProcess) -> None:
    bundle = next(VIEWER.glob("app.bundle.*.js")).name
    plain = httpx.get(f"{server.base_url}/viewer/{bundle}", headers={"Accept-Encoding": ""})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    assert plain.content == (VIEWER / bundle).read_bytes()
    assert "immutable" in plain.headers["cache-control"]
    packed = httpx.get(f"{server.base_url}/viewer/{bundle}",
                       headers={"Accept-Encoding": "gzip"})
    assert packed.headers["content-encoding"] == "gzip"
    assert packed.content == plain.content  # httpx decodes it
    assert int(packed.headers["content-length"]) < len(plain.content) / 2
    assert plain.headers["x-content-type-options"] == "nosniff"
    svg = next(VIEWER.glob("*.svg")).name
    assert httpx.get(f"{server.base_url}/viewer/{svg}").headers[
        "content-security-policy"].startswith("default-src 'none'")
    wasm = next(VIEWER.glob("*.wasm")).name
    assert httpx.get(f"{server.base_url}/viewer/{wasm}").headers["content-type"] == \
        "application/wasm"


@pytest.mark.parametrize("path", ["/viewer/../pyproject.toml", "/viewer/%2e%2e/pyproject.toml",
                                  "/viewer/..%2fVERSION", "/viewer/VERSION/..%2f..%2fREADME.md",
                                  "/viewer/missing.js", "/viewer/index.html.gz",
                                  "/viewer/a%00b.js", "/viewer/%2fetc%2fpasswd",
                                  "/viewer/silent-refresh.html",
                                  "/viewer/customizations/index.html"])
def test_nothing_outside_the_viewer_folder_is_served(server: PasserelleProcess,
                                                     path: str) -> None:
    answer = httpx.get(f"{server.base_url}{path}")
    assert "[project]" not in answer.text and "# Passerelle" not in answer.text
    assert "root:" not in answer.text
    assert answer.status_code in (200, 404)  # 200: the viewer's page, for its own routes
    if answer.status_code == 200:
        assert '<div id="root"' in answer.text


def test_a_viewer_not_installed_says_how_to_install_it(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", viewer_dir=str(tmp_path / "none"),
                           http_workers="1", dicom_receivers="1") as server:
        answer = httpx.get(f"{server.base_url}/viewer/viewer?StudyInstanceUIDs=1.2.3")
    assert answer.status_code == 503 and "scripts/setup.sh" in answer.text
