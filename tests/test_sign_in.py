"""Sign-in of the console (OpenID Connect, authorization code flow + PKCE) in a real headless
Chromium against a real ``passerelle serve`` (two HTTP workers) and the local test issuer
(tests/issuer.py): signing in, the read-to-view / admin-to-act split, the session as a
credential for reads and console actions only, forged requests, altered or ended sessions,
open redirects, signing out; the relying party alone against the issuer (a confidential
client, replayed codes, a wrong nonce); bearer tokens on the console without sign-in."""

import asyncio
import base64
import json
import multiprocessing
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from pydicom.uid import generate_uid
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from gateway.config import AuthSettings, Settings
from gateway.security import key_file
from gateway.security.openid import LoginRequest, RelyingParty, SignInError, _endpoint
from gateway.security.tokens import TokenVerifier
from gateway.web.console.sign_in import safe_next
from gateway.web.middleware.session import KEY_FILE, Sealer
from tests.browser import chromium, ohif_notice_acknowledged
from tests.forged_form import forged_form
from tests.inprocess import InProcessService
from tests.issuer import AUDIENCE, CLIENT_ID, LocalIssuer
from tests.processes import PasserelleProcess, free_port, wait_for
from tests.scu import send
from tests.synthetic import ct_slice

USERS = {"reader": "dicomweb.read", "admin": "dicomweb.read passerelle.admin",
         "nobody": "openid"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer() as local:
        local.users.update(USERS)
        yield local


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           issuer: LocalIssuer) -> Iterator[PasserelleProcess]:
    port = free_port()
    with PasserelleProcess(tmp_path_factory.mktemp("sign-in") / "data", http_port=str(port),
                           http_workers="2", dicom_receivers="1", stable_seconds="3600",
                           **issuer.sign_in_settings(f"http://127.0.0.1:{port}")) as process:
        process.study = generate_uid()  # type: ignore[attr-defined]
        assert send(process.dicom_port, ct_slice(process.study, generate_uid(), 1, 1,  # type: ignore[attr-defined]
                                                 size=8))[0] == 0
        yield process


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium("fr") as driver:
        yield driver


def _admin(server: PasserelleProcess, issuer: LocalIssuer, path: str) -> httpx.Response:
    """A request of the admin API with a bearer token (as a script would make it)."""
    return httpx.get(f"{server.base_url}{path}",
                     headers={"Authorization": f"Bearer {issuer.token('passerelle.admin')}"})


def _outbox(server: PasserelleProcess, issuer: LocalIssuer) -> list[dict]:
    listed = _admin(server, issuer, "/admin/outbox?all=true")
    assert listed.status_code == 200, listed.text
    return listed.json()["publications"]


def _sign_in(browser: WebDriver, server: PasserelleProcess, user: str,
             page: str = "/ui/") -> None:
    """Sign out whoever was signed in (cookies cleared), open ``page``, sign in as ``user``
    on the issuer's form, and wait to be back on the console."""
    browser.get(f"{server.base_url}/health")
    browser.delete_all_cookies()
    browser.get(f"{server.base_url}{page}")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "username"),
                                     "the issuer's sign-in form")
    browser.find_element(By.ID, "username").send_keys(user)
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "user"),
                                     f"back on the console as {user}")


def _fetch(browser: WebDriver, url: str, method: str = "GET", body: str = "",
           accept: str = "application/json") -> tuple[int, str]:
    """(status, text) of a same-origin fetch by the page (cookies sent, as OHIF's)."""
    return tuple(browser.execute_async_script("""
        const [url, method, body, accept, done] = arguments;
        const init = {method, credentials: "same-origin", headers: {"Accept": accept}};
        if (method === "POST") {
          init.body = body;
          init.headers["Content-Type"] = "application/x-www-form-urlencoded";
        }
        fetch(url, init).then(r => r.text().then(t => done([r.status, t])),
                              e => done([0, String(e)]));
    """, url, method, body, accept))  # type: ignore[return-value]


def _session_cookie(browser: WebDriver) -> str:
    cookie = browser.get_cookie("passerelle_session")
    assert cookie is not None, browser.get_cookies()
    return cookie["value"]


def test_a_browser_signs_in_at_the_issuer_and_comes_back_to_its_page(
        server: PasserelleProcess, issuer: LocalIssuer, browser: WebDriver) -> None:
    study = server.study  # type: ignore[attr-defined]
    browser.get(f"{server.base_url}/health")
    browser.delete_all_cookies()
    browser.get(f"{server.base_url}/ui/studies/{study}")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "username"))
    asked = parse_qs(urlsplit(browser.current_url).query)
    assert browser.current_url.startswith(f"{issuer.url}/authorize?")
    assert asked["response_type"] == ["code"] and asked["client_id"] == [CLIENT_ID]
    assert asked["code_challenge_method"] == ["S256"] and asked["nonce"] and asked["state"]
    assert asked["redirect_uri"] == [f"{server.base_url}/ui/callback"]
    browser.find_element(By.ID, "username").send_keys("reader")
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "user"))
    assert browser.current_url == f"{server.base_url}/ui/studies/{study}"
    assert "Connecté : Reader" in browser.find_element(By.ID, "user").text
    assert browser.find_elements(By.ID, "sign-out")
    exchanged = issuer.token_requests[-1]
    assert exchanged["grant_type"] == "authorization_code" and exchanged["code_verifier"]
    assert exchanged["client_id"] == CLIENT_ID  # a public client: PKCE alone
    cookie = browser.get_cookie("passerelle_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["secure"]
    assert cookie["sameSite"] == "Lax" and cookie["path"] == "/"
    # It ends with the access token (5 minutes), long before the maximum age (8 h).
    assert time.time() + 200 < cookie["expiry"] <= time.time() + issuer.token_seconds + 5
    assert browser.get_cookie("passerelle_login") is None  # the login state is gone
    audit = server.data_dir / "audit" / "audit.jsonl"
    wait_for(lambda: audit.exists() and "sub-reader" in audit.read_text(), 15, "audit")
    assert any("sign-in" in line and "sub-reader" in line
               for line in audit.read_text().splitlines())


def test_a_reader_sees_no_action_and_is_refused_one_posted_anyway(
        server: PasserelleProcess, issuer: LocalIssuer, browser: WebDriver) -> None:
    study = server.study  # type: ignore[attr-defined]
    _sign_in(browser, server, "reader", f"/ui/studies/{study}")
    assert browser.find_element(By.ID, "series")  # the study is shown
    for action in ("publish", "unpublish", "confidentiality"):
        assert not browser.find_elements(By.ID, f"action-{action}")
    assert not browser.find_elements(By.CSS_SELECTOR, ".actions, a.retry")
    # Who saw the study (staff, addresses) is for the admin scope, as in /admin.
    assert not browser.find_elements(By.CSS_SELECTOR, "#seen-by, #seen-by-json")
    # The form token of his own session (the sign-out form carries it): valid, and still
    # not enough.
    token = browser.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    status, page = _fetch(browser, f"/ui/studies/{study}/publish", "POST", f"csrf={token}",
                          accept="text/html")
    assert status == 403 and "Refusé" in page and "passerelle.admin" in page
    browser.get(f"{server.base_url}/ui/studies/{study}/publish")  # the confirmation page
    assert "passerelle.admin" in browser.find_element(By.CSS_SELECTOR, ".error").text
    assert _outbox(server, issuer) == []


def test_the_session_reads_dicomweb_and_never_stores_or_acts_through_it(
        server: PasserelleProcess, issuer: LocalIssuer, browser: WebDriver) -> None:
    study = server.study  # type: ignore[attr-defined]
    _sign_in(browser, server, "admin")
    status, text = _fetch(browser, "/dicom-web/studies")
    assert status == 200 and study in text  # as the viewer will call it
    assert _fetch(browser, f"/wado?requestType=WADO&studyUID={study}")[0] != 401
    assert _fetch(browser, "/admin/studies")[0] == 200
    # The viewer's page and files, with the session.
    status, text = _fetch(browser, "/viewer/index.html", accept="text/html")
    assert status == 200 and '<div id="root"' in text
    # Unsafe requests outside the console need a bearer token, whatever the cookie says.
    stow = _fetch(browser, "/dicom-web/studies", "POST", "x")
    assert stow[0] == 401 and "bearer token" in stow[1]
    assert _fetch(browser, f"/admin/studies/{study}/publish", "POST")[0] == 401
    assert _outbox(server, issuer) == []
    # The same cookie, from a script: as the browser sends it (httpx does not send a
    # Secure cookie over http by itself).
    cookie = {"Cookie": f"passerelle_session={_session_cookie(browser)}"}
    answer = httpx.get(f"{server.base_url}/dicom-web/studies", headers=cookie)
    assert answer.status_code == 200
    # One person's answer: no shared cache keeps it (the cookie is no Authorization header).
    assert answer.headers["cache-control"].startswith("private")
    assert "Cookie" in answer.headers["vary"]
    for attempt in range(6):  # new connections, served by either HTTP worker
        with httpx.Client() as client:
            assert client.get(f"{server.base_url}/admin/outbox", headers=cookie
                              ).status_code == 200, attempt
    assert httpx.post(f"{server.base_url}/admin/studies/{study}/publish",
                      headers=cookie).status_code == 401


def test_an_admin_acts_from_the_console(server: PasserelleProcess, issuer: LocalIssuer,
                                        browser: WebDriver) -> None:
    study = server.study  # type: ignore[attr-defined]
    _sign_in(browser, server, "admin", f"/ui/studies/{study}")
    assert browser.find_element(By.ID, "seen-by-json")  # who saw it, for the admin
    browser.find_element(By.ID, "action-publish").click()
    browser.find_element(By.ID, "confirm").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".notice"))
    queued = _outbox(server, issuer)
    assert [(row["study_uid"], row["action"]) for row in queued] == [(study, "publish")]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_forged_post_from_another_site_or_origin_is_refused(
        server: PasserelleProcess, issuer: LocalIssuer, browser: WebDriver, host: str) -> None:
    """localhost is another site: the Lax cookie stays home, the request has no session.
    127.0.0.1 on another port is the same site but another origin: the cookie goes, the
    form token and the Origin do not match."""
    study = server.study  # type: ignore[attr-defined]
    _sign_in(browser, server, "admin", f"/ui/studies/{study}")
    before = len(_outbox(server, issuer))
    with forged_form(f"{server.base_url}/ui/studies/{study}/unpublish") as port:
        browser.get(f"http://{host}:{port}/")
        WebDriverWait(browser, 30).until(lambda d: d.current_url.startswith(
            server.base_url) and d.find_elements(By.CSS_SELECTOR, ".error"))
        error = browser.find_element(By.CSS_SELECTOR, ".error").text
        assert "Refusé" in error
        assert ("not signed in" if host == "localhost" else "another origin") in error
    assert len(_outbox(server, issuer)) == before


def test_an_altered_ended_or_foreign_session_is_signed_out(
        server: PasserelleProcess, issuer: LocalIssuer, browser: WebDriver) -> None:
    _sign_in(browser, server, "admin")
    value = _session_cookie(browser)
    payload, _, mac = value.partition(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    own = Sealer((server.data_dir / KEY_FILE).read_bytes(), "session")
    assert stat.S_IMODE((server.data_dir / KEY_FILE).stat().st_mode) == 0o600
    assert own.open(value) is not None
    admin_fields = {**fields["f"], "scp": ["dicomweb.read", "passerelle.admin"]}
    candidates = {
        "altered signature": f"{payload}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}",
        "altered payload": f"{payload[:-2]}x{payload[-1]}.{mac}",
        "ended": own.seal(admin_fields, time.time() - 1),
        # Sealed by this service's key with a far end time, but begun past the maximum age.
        "older than the maximum age": own.seal(
            {**admin_fields, "iat": int(time.time()) - 9 * 3600}, time.time() + 86400),
        "no start time": own.seal({k: v for k, v in admin_fields.items() if k != "iat"},
                                  time.time() + 600),
        "another key": Sealer(b"k" * 32, "session").seal(admin_fields, time.time() + 600),
        "another purpose": Sealer((server.data_dir / KEY_FILE).read_bytes(), "login").seal(
            admin_fields, time.time() + 600),
        "garbage": "not-a-session",
    }
    for name, cookie in candidates.items():
        page = httpx.get(f"{server.base_url}/ui/health", headers={
            "Cookie": f"passerelle_session={cookie}", "Accept": "text/html"})
        assert page.status_code == 303, name
        assert page.headers["location"] == "/ui/login?next=%2Fui%2Fhealth", name
        assert 'passerelle_session=""' in page.headers["set-cookie"], name  # cleared
        api = httpx.get(f"{server.base_url}/dicom-web/studies",
                        headers={"Cookie": f"passerelle_session={cookie}"})
        assert api.status_code == 401, name
    # In the browser: an altered cookie sends the person to sign in again.
    browser.add_cookie({"name": "passerelle_session", "value": candidates["altered payload"],
                        "path": "/", "secure": True, "httpOnly": True, "sameSite": "Lax"})
    browser.get(f"{server.base_url}/ui/")
    WebDriverWait(browser, 30).until(lambda d: d.current_url.startswith(issuer.url))


def test_without_a_session_pages_go_to_sign_in_and_api_clients_get_401(
        server: PasserelleProcess) -> None:
    html = {"Accept": "text/html,application/xhtml+xml"}
    for path, expected in (("/ui/", "/ui/login?next=%2Fui%2F"),
                           ("/ui/?patient_id=P1", "/ui/login?next=%2Fui%2F%3Fpatient_id%3DP1"),
                           ("/viewer/", "/ui/login?next=%2Fviewer%2F"),
                           ("/viewer/index.html", "/ui/login?next=%2Fviewer%2Findex.html")):
        page = httpx.get(f"{server.base_url}{path}", headers=html)
        assert (page.status_code, page.headers.get("location")) == (303, expected), path
    for path, headers in (("/ui/", {}), ("/ui/", {**html, "Authorization": "Bearer x"}),
                          ("/dicom-web/studies", html), ("/viewer/", {})):
        assert httpx.get(f"{server.base_url}{path}", headers=headers).status_code == 401, path
    assert httpx.get(f"{server.base_url}/ui/static/console.css").status_code == 200
    root = httpx.get(f"{server.base_url}/ui", headers=html)  # no slash: the console's root
    assert (root.status_code, root.headers["location"]) == (307, "/ui/")


def test_being_sent_to_sign_in_is_a_failed_authentication_never_an_access(
        server: PasserelleProcess, issuer: LocalIssuer) -> None:
    """Pages asked for without a session, or with a cookie that does not open, are audited
    as refused authentications (aggregated per client: a flood cannot rotate the trail
    away) and never as an anonymous access to the study."""
    study = server.study  # type: ignore[attr-defined]
    html = {"Accept": "text/html"}
    altered = {**html, "Cookie": "passerelle_session=eyJmIjp7fX0.forged"}
    audit = server.data_dir / "audit" / "audit.jsonl"
    time.sleep(1)  # what earlier tests caused is written
    before = len(audit.read_text().splitlines())
    for headers in [html] * 30 + [altered] * 30:
        assert httpx.get(f"{server.base_url}/ui/studies/{study}",
                         headers=headers).status_code == 303
    assert server.metric("passerelle_auth_failures_total", reason="session") >= 30
    time.sleep(1)  # the writer's batch
    lines = [json.loads(line) for line in audit.read_text().splitlines()[before:]]
    naming = [line for line in lines
              if study in json.dumps(line.get("ParticipantObjectIdentification"))
              and "anonymous" in json.dumps(line)]
    assert naming == []  # no study (nor patient) named for who was not let in
    refused = [line for line in lines if "/ui/studies/" in json.dumps(line)
               and "no valid token" in json.dumps(line)]
    # At most the first of each reason in full (this period's, if not written already);
    # the others are counted, into one Security Alert at the period's end.
    assert len(refused) <= 2
    seen = _admin(server, issuer, f"/admin/studies/{study}/access").json()["access"]
    assert "anonymous" not in {row["user"] for row in seen}


@pytest.mark.parametrize(("asked", "kept"), [
    ("/ui/studies/1.2.3?done=publish", "/ui/studies/1.2.3?done=publish"),
    ("/viewer/?StudyInstanceUIDs=1.2", "/viewer/?StudyInstanceUIDs=1.2"),
    ("https://evil.example/ui/", "/ui/"), ("//evil.example/ui/", "/ui/"),
    ("/\\evil.example", "/ui/"), ("/ui/\\\\evil.example", "/ui/"), ("/admin/outbox", "/ui/"),
    ("/ui/\r\nSet-Cookie: x=1", "/ui/"), ("", "/ui/"), ("javascript:alert(1)", "/ui/"),
    ("/ui/" + "a" * 3000, "/ui/")])
def test_the_page_to_go_back_to_is_one_of_ours(asked: str, kept: str) -> None:
    assert safe_next(asked) == kept


def test_an_open_redirect_after_sign_in_is_refused(
        server: PasserelleProcess, browser: WebDriver) -> None:
    _sign_in(browser, server, "reader", "/ui/login?next=https%3A%2F%2Fevil.example%2F")
    assert browser.current_url == f"{server.base_url}/ui/"


def test_signing_out_clears_the_session(server: PasserelleProcess, issuer: LocalIssuer,
                                        browser: WebDriver) -> None:
    _sign_in(browser, server, "reader")
    old = _session_cookie(browser)
    browser.find_element(By.ID, "sign-out").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "p.notice"))
    assert "déconnecté" in browser.find_element(By.CSS_SELECTOR, "p.notice").text
    assert browser.get_cookie("passerelle_session") is None
    assert not browser.find_elements(By.ID, "user")
    browser.get(f"{server.base_url}/ui/")
    WebDriverWait(browser, 30).until(lambda d: d.current_url.startswith(issuer.url))
    # Signing out needs the form token: another site cannot sign the user out either.
    forged = httpx.post(f"{server.base_url}/ui/logout", content="csrf=x", headers={
        **FORM, "Cookie": f"passerelle_session={old}", "Accept": "text/html"})
    assert forged.status_code == 403
    assert "passerelle_session" not in forged.headers.get("set-cookie", "")


def test_a_user_without_the_read_scope_or_not_allowed_is_refused(
        server: PasserelleProcess, browser: WebDriver) -> None:
    browser.get(f"{server.base_url}/health")
    browser.delete_all_cookies()
    browser.get(f"{server.base_url}/ui/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "username"))
    browser.find_element(By.ID, "username").send_keys("nobody")  # signs in, may read nothing
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".error"))
    assert "dicomweb.read" in browser.find_element(By.CSS_SELECTOR, ".error").text
    assert browser.get_cookie("passerelle_session") is None  # refused at the callback
    # A callback without its login state (another browser's, or replayed) is refused.
    replayed = httpx.get(f"{server.base_url}/ui/callback?code=x&state=y")
    assert replayed.status_code == 400 and "passerelle_session" not in \
        replayed.headers.get("set-cookie", "")


CONFIDENTIAL = "confidential-client"


def _code(issuer: LocalIssuer, login: LoginRequest, redirect_uri: str) -> str:
    """An authorization code the issuer gives ``admin`` for ``login`` (its form, posted)."""
    location = issuer.authorize({
        "username": "admin", "client_id": CONFIDENTIAL, "redirect_uri": redirect_uri,
        "response_type": "code", "code_challenge_method": "S256", "state": login.state,
        "nonce": login.nonce, "code_challenge": create_s256_code_challenge(login.verifier)})
    return parse_qs(urlsplit(location).query)["code"][0]


def test_the_relying_party_as_a_confidential_client(issuer: LocalIssuer) -> None:
    redirect_uri = "https://passerelle.example/ui/callback"
    settings = issuer.sign_in_settings("https://passerelle.example", "s3cret", CONFIDENTIAL)
    auth = AuthSettings(**{k.removeprefix("auth_"): v for k, v in settings.items()})
    party = RelyingParty(auth, redirect_uri, TokenVerifier(auth.issuer, auth.jwks_url,
                                                           AUDIENCE, 30))

    async def sign_in(login: LoginRequest, code: str) -> object:
        return await party.identity(code, login)

    login = LoginRequest.new("/ui/")
    code = _code(issuer, login, redirect_uri)
    identity = asyncio.run(sign_in(login, code))
    assert identity.subject == "sub-admin" and "passerelle.admin" in identity.scopes  # type: ignore[attr-defined]
    assert "client_id" not in issuer.token_requests[-1]  # authenticated by HTTP Basic
    with pytest.raises(SignInError, match="invalid_grant"):  # a code is used once
        asyncio.run(sign_in(login, code))
    with pytest.raises(SignInError, match="invalid_grant"):  # another verifier
        asyncio.run(sign_in(LoginRequest(login.state, login.nonce, "v" * 64, "/ui/"),
                            _code(issuer, login, redirect_uri)))
    with pytest.raises(SignInError, match="nonce"):  # an ID token for another request
        asyncio.run(sign_in(LoginRequest(login.state, "another", login.verifier, "/ui/"),
                            _code(issuer, login, redirect_uri)))
    wrong = RelyingParty(AuthSettings(**{**auth.model_dump(), "client_secret": "wrong"}),
                         redirect_uri, party.verifier)
    with pytest.raises(SignInError, match="invalid_client"):
        asyncio.run(wrong.identity(_code(issuer, login, redirect_uri), login))


def test_bearer_tokens_on_the_console_read_to_view_admin_to_act(
        tmp_path: Path, issuer: LocalIssuer) -> None:
    with InProcessService(tmp_path / "data", **issuer.settings()) as service:
        study = generate_uid()
        service.ingest(ct_slice(study, generate_uid(), 1, 1, size=8))
        reader = {"Authorization": f"Bearer {issuer.token('dicomweb.read')}",
                  "Accept": "text/html"}
        admin = {"Authorization": f"Bearer {issuer.token('dicomweb.read passerelle.admin')}",
                 "Accept": "text/html"}
        page = service.get(f"/ui/studies/{study}", headers=reader)
        assert page.status_code == 200 and "action-publish" not in page.text
        assert "sign-out" not in page.text  # no session to end
        token = re.search(r'name="csrf" value="([^"]+)"', service.get(
            f"/ui/studies/{study}/publish", headers=admin).text)
        assert token is not None
        refused = service.post(f"/ui/studies/{study}/publish", content=f"csrf={token[1]}",
                               headers={**reader, **FORM})
        assert refused.status_code == 403 and "Refusé" in refused.text
        assert "action-publish" in service.get(f"/ui/studies/{study}", headers=admin).text
        done = service.post(f"/ui/studies/{study}/publish", content=f"csrf={token[1]}",
                            headers={**admin, **FORM})
        assert done.status_code == 303
        assert service.get("/ui/login", headers=admin).status_code == 404  # no sign-in
        assert service.get("/ui/", headers={"Accept": "text/html"}).status_code == 401


def _key_of(path: str, results: "multiprocessing.Queue[bytes]") -> None:
    results.put(key_file.load_or_create(Path(path)))


def test_every_process_gets_the_same_session_key(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    results: multiprocessing.Queue[bytes] = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=_key_of, args=(str(path), results))
                 for _ in range(4)]
    for process in processes:
        process.start()
    keys = {results.get(timeout=30) for _ in processes}
    for process in processes:
        process.join(30)
    assert len(keys) == 1 and len(keys.pop()) == key_file.KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no draft left


@pytest.mark.parametrize(("settings", "problem"), [
    ({"auth_client_id": "c"}, "needs auth_issuer"),
    ({"auth_client_id": "c", "auth_issuer": "https://i", "auth_jwks_url": "https://i/k",
      "auth_audience": "a", "public_url": "http://imaging.example"}, "https public_url"),
    ({"auth_session_secret": "short"}, "at least 32"),
    ({"auth_session_max_age_seconds": "172800"}, "less than or equal")])
def test_sign_in_settings_are_checked(settings: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Settings(**settings)


def test_the_discovery_document_defaults_to_the_issuers() -> None:
    auth = Settings(auth_issuer="https://issuer.example/realms/h", auth_jwks_url="https://k",
                    auth_audience="a", auth_client_id="c",
                    public_url="https://imaging.example").auth
    assert auth.discovery_url == \
        "https://issuer.example/realms/h/.well-known/openid-configuration"
    assert auth.sign_in and "client_secret" not in repr(auth)


def test_a_reader_signed_in_opens_a_study_in_the_viewer(
        server: PasserelleProcess, browser: WebDriver) -> None:
    """The viewer's page, files and DICOMweb calls all go with the session: the image is
    drawn (the viewport's canvas is not blank) for a user with the read scope only."""
    study = server.study  # type: ignore[attr-defined]
    ohif_notice_acknowledged(browser)
    _sign_in(browser, server, "reader", f"/ui/studies/{study}")
    browser.find_element(By.ID, "open-viewer").click()
    WebDriverWait(browser, 60, poll_frequency=0.5).until(
        lambda d: d.execute_script(_CANVAS_LIT), "an image drawn in the viewer")


_CANVAS_LIT = """
const canvas = document.querySelector('canvas.cornerstone-canvas');
const context = canvas && canvas.width && canvas.getContext('2d');
if (!context) return false;
const {data} = context.getImageData(0, 0, canvas.width, canvas.height);
return data.some((value, i) => i % 4 !== 3 && value > 16);
"""


@pytest.mark.parametrize("url", ["http://[::1", "https://[::1/t", "http://issuer.example/a",
                                 "https:///nohost", "ftp://127.0.0.1/a", 7, None])
def test_an_unusable_endpoint_in_the_discovery_document_is_a_clear_refusal(
        url: object) -> None:
    with pytest.raises(SignInError, match="no usable https authorization_endpoint"):
        _endpoint({"authorization_endpoint": url}, "authorization_endpoint")


def test_a_loopback_or_https_endpoint_is_usable() -> None:
    for url in ("https://issuer.example/auth", "http://127.0.0.1:8/auth", "http://[::1]:8/a"):
        assert _endpoint({"token_endpoint": url}, "token_endpoint") == url
