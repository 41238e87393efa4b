"""What stands between a page of another site and the gateway's actions (in process; the
real-browser case is tests/test_console.py): the origin check of the /admin actions, the
host names served without authentication (DNS rebinding), the console's form token, the
framing headers; and the audit of a page that refreshes itself."""

import re
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from gateway.security.audit import read_events
from tests.inprocess import InProcessService
from tests.synthetic import ct_slice

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def service(tmp_path: Path) -> InProcessService:
    with InProcessService(tmp_path / "data") as service:
        service.study = generate_uid()  # type: ignore[attr-defined]
        service.ingest(ct_slice(service.study, generate_uid(), 1, 1, size=8))  # type: ignore[attr-defined]
        yield service


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"},
                                     {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "null", "Content-Type": "text/plain"}])
def test_an_admin_action_another_site_made_the_browser_send_is_refused(
        service: InProcessService, headers: dict[str, str]) -> None:
    study = service.study  # type: ignore[attr-defined]
    refused = service.post(f"/admin/studies/{study}/confidentiality", content='{"level":"V"}',
                           headers=headers)
    assert refused.status_code == 403 and "refused" in refused.json()["error"]
    assert service.get("/admin/outbox").json()["total"] == 0
    # A script (no Origin) or the service's own pages are served.
    assert service.post(f"/admin/studies/{study}/publish").status_code == 202
    assert service.post(f"/admin/studies/{study}/publish",
                        headers={"Origin": service.base_url}).status_code == 202


@pytest.mark.parametrize(("host", "served"), [
    ("evil.example", False), ("evil.example:8080", False), ("127.0.0.1:8080", True),
    ("localhost", True), ("[::1]:8080", True), ("passerelle.test", True), ("[::1", False),
    ("", False)])
def test_without_authentication_only_this_machines_names_are_served(
        service: InProcessService, host: str, served: bool) -> None:
    response = service.get("/ui/", headers={"Host": host})
    assert (response.status_code == 200) is served, response.text[:200]
    if not served:
        assert response.status_code == 400 and "not served" in response.json()["error"]


def test_the_console_form_token_must_be_its_own_and_long(service: InProcessService) -> None:
    study = service.study  # type: ignore[attr-defined]
    page = service.get(f"/ui/studies/{study}/publish")
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    service._client.cookies.set("passerelle_csrf", "a", path="/ui")
    short = service.post(f"/ui/studies/{study}/publish", content="csrf=a", headers=FORM)
    assert short.status_code == 403
    service._client.cookies.set("passerelle_csrf", token.group(1), path="/ui")
    done = service.post(f"/ui/studies/{study}/publish", content=f"csrf={token.group(1)}",
                        headers=FORM)
    assert done.status_code == 303
    assert service.get(f"/ui/studies/{generate_uid()}/publish").status_code == 404


def test_a_page_refreshing_itself_is_audited_once_not_at_each_refresh(tmp_path: Path) -> None:
    with InProcessService(tmp_path / "data") as service:
        study = generate_uid()
        service.ingest(ct_slice(study, generate_uid(), 1, 1, size=8))
        assert service.get(f"/ui/studies/{study}").status_code == 200
        for _ in range(5):
            assert service.get(f"/ui/studies/{study}/publications").status_code == 200
        assert service.get("/ui/health").status_code == 200
    details = [message["EventIdentification"].get("EventOutcomeDescription", "")
               for message in read_events(tmp_path / "data" / "audit")]
    assert sum(f"/ui/studies/{study}/publications" in d for d in details) == 1
    assert sum(d.startswith(f"GET /ui/studies/{study} ") for d in details) == 1
    assert not any("/ui/health" in d for d in details)
