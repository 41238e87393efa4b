"""Screenshots of the console and the viewer for the README: a service with the local
registry, a few generated studies (one published, one refused by the registry) and one of
pydicom-data's ultrasound images, the pages in headless Chromium (``./scripts/test.sh``
installs it), saved as PNG files in ``docs/``.

Usage: .venv/bin/python scripts/console_screenshots.py
"""

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from tests.browser import chromium, ohif_notice_acknowledged  # noqa: E402
from tests.conftest import _local_test_files  # noqa: E402
from tests.faulty_proxy import FaultyProxy  # noqa: E402
from tests.processes import PasserelleProcess, RegistryProcess, wait_for  # noqa: E402
from tests.scu import send  # noqa: E402
from tests.synthetic import national_ct_slice  # noqa: E402


def main() -> None:
    """Make the screenshots."""
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as work, RegistryProcess(
            Path(work) / "registry") as registry, FaultyProxy(registry.http_port) as proxy, \
            PasserelleProcess(Path(work) / "data", registry_url=proxy.url,
                              stable_seconds="1", order_issuer_oid="1.2.250.1.999.1.1.3",
                              http_workers="1", dicom_receivers="1",
                              viewer_dir=str(REPO / "viewer")) as server:
        published, refused = generate_uid(), generate_uid()
        for study, date, count in ((published, "20261130", 3), (refused, "20261201", 2)):
            series = generate_uid()
            for number in range(1, count + 1):
                assert send(server.dicom_port, national_ct_slice(
                    study, series, 1, number, StudyDate=date))[0] == 0
            if study == published:
                wait_for(lambda: registry.documents(published), 60, "the first manifest")
                proxy.mode = "400"
        time.sleep(4)  # the second study is queued and refused
        with chromium("fr") as browser:
            ohif_notice_acknowledged(browser)
            browser.get(f"{server.base_url}/ui/")
            browser.save_screenshot(str(docs / "console-studies.png"))
            browser.get(f"{server.base_url}/ui/studies/{refused}")
            wait_for(lambda: browser.find_elements(By.CSS_SELECTOR,
                                                   'tr.publication[data-state="failed"]'),
                     60, "the refusal on the page")
            browser.save_screenshot(str(docs / "console-study.png"))
            browser.get(f"{server.base_url}/ui/health")
            browser.save_screenshot(str(docs / "console-health.png"))
            ultrasound = next(p for p in _local_test_files() if p.name == "US1_J2KR.dcm")
            assert send(server.dicom_port, ultrasound)[0] == 0
            browser.get(f"{server.base_url}/ui/studies/"
                        f"{dcmread(ultrasound, stop_before_pixels=True).StudyInstanceUID}")
            browser.find_element(By.ID, "open-viewer").click()
            time.sleep(8)  # the image, its thumbnail, the cine bar
            browser.save_screenshot(str(docs / "viewer.png"))
        proxy.mode = "forward"
    written = [*sorted(docs.glob("console-*.png")), docs / "viewer.png"]
    print(f"written: {', '.join(path.name for path in written)}")


if __name__ == "__main__":
    main()
