"""The operator console at /ui/ in a real headless Chromium (tests/browser.py) against a
running ``passerelle serve`` and the local registry: a study sent by storescu appears, its
publication becomes acknowledged without reloading, a registry refusal shows the registry's
reason, a retry after the fix publishes, a forged cross-site POST is refused; French by
default, English by Accept-Language."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import chromium
from tests.faulty_proxy import FaultyProxy
from tests.forged_form import forged_form
from tests.processes import PasserelleProcess, RegistryProcess
from tests.scu import send
from tests.synthetic import ct_slice, national_ct_slice

ORDER_ISSUER = "1.2.250.1.999.1.1.3"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium("fr") as driver:
        yield driver


def _wait(driver: WebDriver, css: str, seconds: float = 30) -> None:
    WebDriverWait(driver, seconds, poll_frequency=0.2).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, css), f"{css} on {driver.current_url}")


def _in_history(driver: WebDriver, css: str, act: str) -> str:
    """``act`` ("click" or "text") on the element of ``css`` in the publication history,
    found again if the page's refresh replaced it meanwhile."""
    def attempt(d: WebDriver) -> str | bool:
        try:
            element = d.find_element(By.CSS_SELECTOR, css)
            return element.text if act == "text" else (element.click() or True)
        except StaleElementReferenceException:
            return False
    return WebDriverWait(driver, 10, poll_frequency=0.1).until(attempt, css)


def _publication_state(driver: WebDriver) -> list[str]:
    try:
        return [row.get_attribute("data-state") or ""
                for row in driver.find_elements(By.CSS_SELECTOR, "tr.publication")]
    except StaleElementReferenceException:  # replaced by the page's refresh meanwhile
        return []


def test_a_study_sent_by_storescu_appears_and_is_acknowledged_without_reloading(
        tmp_path: Path, browser: WebDriver) -> None:
    study = generate_uid()
    with RegistryProcess(tmp_path / "registry") as registry, PasserelleProcess(
            tmp_path / "data", registry_url=registry.fhir_url, stable_seconds="2",
            order_issuer_oid=ORDER_ISSUER, http_workers="1", dicom_receivers="1") as server:
        for number in (1, 2):
            assert send(server.dicom_port, national_ct_slice(study, generate_uid(), 1,
                                                             number))[0] == 0
        browser.get(f"{server.base_url}/")  # redirected to the console
        assert browser.current_url == f"{server.base_url}/ui/"
        _wait(browser, f'tr[data-study="{study}"]')
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-study="{study}"]')
        assert "ACC-2026-000457" in row.text and "CT" in row.text
        assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "fr"
        assert "Examens" in browser.find_element(By.TAG_NAME, "h1").text
        row.find_element(By.TAG_NAME, "a").click()
        _wait(browser, "#series")
        loaded = browser.execute_script("return performance.timeOrigin")
        # The watcher queues the study once stable; the publisher sends it; the page's
        # history refreshes itself.
        WebDriverWait(browser, 60, poll_frequency=0.5).until(
            lambda d: _publication_state(d) == ["acknowledged"], "acknowledged, in place")
        assert browser.execute_script("return performance.timeOrigin") == loaded  # no reload
        cell = browser.find_element(By.CSS_SELECTOR, "tr.publication").text
        assert "Acquittée" in cell
        assert registry.documents(study)[0]["id"] in cell  # the DocumentReference id


def test_a_registry_refusal_shows_its_reason_and_a_retry_after_the_fix_publishes(
        tmp_path: Path, browser: WebDriver) -> None:
    study = generate_uid()
    with RegistryProcess(tmp_path / "registry") as registry, \
            FaultyProxy(registry.http_port) as proxy, PasserelleProcess(
                tmp_path / "data", registry_url=proxy.url, stable_seconds="3600",
                order_issuer_oid=ORDER_ISSUER, http_workers="1", dicom_receivers="1") as server:
        proxy.mode = "400"
        assert send(server.dicom_port, national_ct_slice(study, generate_uid(), 1, 1))[0] == 0
        browser.get(f"{server.base_url}/ui/studies/{study}")
        browser.find_element(By.ID, "action-publish").click()
        browser.find_element(By.ID, "confirm").click()  # the confirmation page's form
        assert "Demande enregistrée" in browser.find_element(By.CSS_SELECTOR, ".notice").text
        WebDriverWait(browser, 60, poll_frequency=0.5).until(
            lambda d: _publication_state(d) == ["failed"], "the refusal, in place")
        answer = _in_history(browser, "tr.publication .answer", "text")
        assert "unknown assigning authority" in answer and "invalid" in answer
        proxy.mode = "forward"  # the registry's side is fixed
        _in_history(browser, "a.retry", "click")
        browser.find_element(By.ID, "confirm").click()
        WebDriverWait(browser, 60, poll_frequency=0.5).until(
            lambda d: _publication_state(d) == ["acknowledged"], "acknowledged after retry")
        assert len(registry.documents(study)) == 1


def test_a_forged_cross_site_post_is_refused_and_queues_nothing(
        tmp_path: Path, browser: WebDriver) -> None:
    study = generate_uid()
    with PasserelleProcess(tmp_path / "data", http_workers="1", dicom_receivers="1",
                           stable_seconds="3600") as server:  # nothing queued by itself
        assert send(server.dicom_port, ct_slice(study, generate_uid(), 1, 1, size=8))[0] == 0
        browser.get(f"{server.base_url}/ui/studies/{study}")  # the operator has a session
        # localhost is another site than 127.0.0.1: the browser sends its Origin, and not
        # the SameSite cookie.
        with forged_form(f"{server.base_url}/ui/studies/{study}/publish") as port:
            browser.get(f"http://localhost:{port}/")
            WebDriverWait(browser, 30).until(lambda d: d.current_url.startswith(
                server.base_url), "the forged form posted")
            assert "Refusé" in browser.find_element(By.CSS_SELECTOR, ".error").text
        listed = httpx.get(f"{server.base_url}/admin/outbox?all=true").json()
        assert listed["total"] == 0
        # The same action from the console's own page is done.
        browser.get(f"{server.base_url}/ui/studies/{study}/publish")
        browser.find_element(By.ID, "confirm").click()
        _wait(browser, ".notice")
        assert httpx.get(f"{server.base_url}/admin/outbox").json()["total"] == 1


def test_the_console_speaks_french_by_default_and_english_when_asked(tmp_path: Path) -> None:
    with PasserelleProcess(tmp_path / "data", http_workers="1", dicom_receivers="1") as server:
        french = httpx.get(f"{server.base_url}/ui/health")
        english = httpx.get(f"{server.base_url}/ui/health",
                            headers={"Accept-Language": "de;q=1, en-GB;q=0.8, fr;q=0.5"})
        assert 'lang="fr"' in french.text and "État du service" in french.text
        assert 'lang="en"' in english.text and "Service health" in english.text
        assert english.headers["vary"] == "Accept-Language"
        assert "Réception DICOM" in french.text and "en service" in french.text
