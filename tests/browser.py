"""A real headless Chromium for the tests (Debian ``chromium`` + ``chromium-driver``, driven
by selenium; nothing downloaded at run time)."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(language: str = "fr", javascript: bool = True, web_security: bool = True
             ) -> Iterator[webdriver.Chrome]:
    """A headless Chromium speaking ``language`` (its Accept-Language), 1280x900;
    ``web_security`` off: pages may read any origin without CORS (benchmarks only)."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900",
                     f"--lang={language}"):
        options.add_argument(argument)
    if not web_security:
        options.add_argument("--disable-web-security")
    options.add_experimental_option("prefs", {"intl.accept_languages": language,
                                              "webkit.webprefs.javascript_enabled":
                                              javascript})
    driver = webdriver.Chrome(options=options, service=Service(
        shutil.which("chromedriver") or CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def ohif_notice_acknowledged(driver: webdriver.Chrome) -> None:
    """Have every page of ``driver`` start with OHIF's investigational-use notice already
    acknowledged (as "Confirm and hide" leaves it in the browser's storage), so that what
    is measured or read is the viewer, not the banner over it."""
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "localStorage.setItem('investigationalUseDialog',"
        " JSON.stringify({expiryDate: '2100-01-01T00:00:00Z'}));")})
