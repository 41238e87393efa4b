"""What the console says, without a browser: both languages have every word, the language
negotiation, odd requests."""

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from gateway.security.audit import ACCESS_KINDS
from gateway.web.console import language
from tests.inprocess import InProcessService
from tests.synthetic import ct_slice


def test_every_word_exists_in_every_language() -> None:
    keys = {lang: set(language._WORDS[lang]) for lang in language.LANGUAGES}
    assert keys["fr"] == keys["en"]
    assert {f"kind_{kind}" for kind in ACCESS_KINDS} <= keys["fr"]  # "Seen by"'s kinds


@pytest.mark.parametrize(("header", "chosen"), [
    ("", "fr"), ("en", "en"), ("en-GB,en;q=0.9", "en"), ("de, en;q=0.5", "en"),
    ("de, ja", "fr"), ("en;q=0.4, fr;q=0.8", "fr"), ("fr-CA", "fr"), ("en;q=x, fr", "fr"),
    ("EN-us", "en"), (",,;;q=,", "fr")])
def test_the_language_is_the_one_the_browser_prefers_among_ours(header: str,
                                                                 chosen: str) -> None:
    assert language.negotiate(header) == chosen


@pytest.mark.parametrize("path", [
    "/ui/?page=0", "/ui/?page=x", "/ui/?page=99999999999", "/ui/?date_from=2024-13-45",
    "/ui/?patient_name=" + "%25" * 500, "/ui/?modality=%00", "/ui/studies/%3Cscript%3E",
    "/ui/studies/1.2.3?done=nothing", "/ui/studies/1.2.3/nothing", "/ui/static/../pages.py",
    "/ui/static/nothing.js", "/ui/health?panel=yes"])
def test_odd_console_requests_get_a_page_not_an_error(tmp_path: Path, path: str) -> None:
    with InProcessService(tmp_path / "data") as service:
        response = service.get(path)
        assert response.status_code < 500, (path, response.text[:500])
        assert "<script>" not in response.text.replace('<script src="/ui/static/console.js"',
                                                      "")


def test_the_console_search_finds_a_patient_by_any_part_of_the_name(tmp_path: Path) -> None:
    with InProcessService(tmp_path / "data") as service:
        study = generate_uid()
        service.ingest(ct_slice(study, generate_uid(), 1, 1, size=8, PatientName="MARTIN^Léa",
                                StudyDate="20240506", accession="ACC-9"))
        for query, found in [("patient_name=martin", True), ("patient_name=lea", True),
                             ("patient_name=Mart", True), ("patient_name=artin", False),
                             ("accession=ACC-9", True), ("accession=ACC", False),
                             ("modality=CT", True), ("modality=MR", False),
                             ("date_from=2024-05-01&date_to=2024-05-31", True),
                             ("date_from=2024-06-01", False), ("date_to=2024-05-06", True)]:
            page = service.get(f"/ui/?{query}")
            assert page.status_code == 200, query
            assert (f'data-study="{study}"' in page.text) is found, query
