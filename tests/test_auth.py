"""Bearer-token access control of a running service, attacked with the tokens a client could
forge or misuse, against a JWKS served by a local issuer."""

import base64
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.security.audit import read_events
from tests.issuer import LocalIssuer
from tests.processes import PasserelleProcess, wait_for

QIDO = "/dicom-web/studies"


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer() as local:
        local.add_key("rsa-0", "RS256")  # published at start, retired by a rotation
        yield local


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           issuer: LocalIssuer) -> Iterator[PasserelleProcess]:
    # One HTTP worker: each worker fetches and caches the JWKS itself, and the fetches
    # counted here are one verifier's.
    with PasserelleProcess(tmp_path_factory.mktemp("auth") / "data", http_workers="1",
                           **issuer.settings()) as process:
        yield process


def _get(server: PasserelleProcess, token: str | None, path: str = QIDO) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(server.base_url + path, headers=headers)


def test_health_and_metrics_need_no_token(server: PasserelleProcess) -> None:
    assert _get(server, None, "/health").status_code == 200
    assert _get(server, None, "/metrics").status_code == 200


def test_no_token_is_a_401_with_a_challenge(server: PasserelleProcess) -> None:
    response = _get(server, None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="passerelle"'
    basic = httpx.get(server.base_url + QIDO, auth=("admin", "admin"))
    assert basic.status_code == 401


def _forged(issuer: LocalIssuer) -> dict[str, str]:
    """Tokens that must all be refused, by what is wrong with them."""
    issuer.add_key("rogue", "RS256", publish=False)
    good = issuer.token()
    header, payload, signature = good.split(".")
    return {
        "expired": issuer.token(exp=int(time.time()) - 120, iat=int(time.time()) - 600),
        "not yet valid": issuer.token(nbf=int(time.time()) + 600),
        "wrong audience": issuer.token(aud="another-service"),
        "wrong issuer": issuer.token(iss="https://evil.example"),
        "no expiry": issuer.token(exp=None),
        "unknown key": issuer.token(kid="rogue"),
        "tampered payload": f"{header}.{issuer.token(scope='passerelle.admin').split('.')[1]}"
                            f".{signature}",
        "alg none": f"eyJhbGciOiJub25lIiwia2lkIjoicnNhLTEifQ.{payload}.",  # {"alg":"none",...}
        "garbage": "not-a-jwt",
    }


def test_forged_or_stale_tokens_are_refused(server: PasserelleProcess,
                                            issuer: LocalIssuer) -> None:
    for name, token in _forged(issuer).items():
        response = _get(server, token)
        assert response.status_code == 401, name
        assert 'error="invalid_token"' in response.headers["www-authenticate"], name
        assert "Traceback" not in response.text
    assert server.metric("passerelle_auth_failures_total", reason="ExpiredSignatureError") >= 1


def test_within_the_clock_skew_a_token_is_accepted(server: PasserelleProcess,
                                                   issuer: LocalIssuer) -> None:
    assert _get(server, issuer.token(exp=int(time.time()) - 10)).status_code == 200


def test_scopes_grant_rights(server: PasserelleProcess, issuer: LocalIssuer) -> None:
    reader = issuer.token("dicomweb.read")
    assert _get(server, reader).status_code == 200
    assert _get(server, issuer.token("dicomweb.read", kid="ec-1")).status_code == 200  # ES256
    stow = httpx.post(f"{server.base_url}/dicom-web/studies", content=b"",
                      headers={"Authorization": f"Bearer {reader}",
                               "Content-Type": "multipart/related; type=application/dicom"})
    assert stow.status_code == 403
    assert stow.headers["www-authenticate"] == ('Bearer realm="passerelle", '
                                                'error="insufficient_scope", '
                                                'scope="dicomweb.write"')
    writer = issuer.token("dicomweb.read dicomweb.write")
    stow = httpx.post(f"{server.base_url}/dicom-web/studies", content=b"",
                      headers={"Authorization": f"Bearer {writer}",
                               "Content-Type": "multipart/related; type=application/dicom"})
    assert stow.status_code not in (401, 403)  # reaches STOW-RS, which judges the body
    admin = httpx.post(f"{server.base_url}/admin/studies/1.2.3/publish",
                       headers={"Authorization": f"Bearer {reader}"})
    assert admin.status_code == 403
    admin = httpx.post(f"{server.base_url}/admin/studies/1.2.3/publish",
                       headers={"Authorization": f"Bearer {issuer.token('passerelle.admin')}"})
    assert admin.status_code == 404  # authorised; the study does not exist
    assert _get(server, issuer.token("openid profile")).status_code == 403


def test_head_needs_what_get_needs(server: PasserelleProcess, issuer: LocalIssuer) -> None:
    """HEAD is answered by the GET handler: the same token, the same refusals; a method no
    route serves is refused before any token is looked at."""
    for token, status in ((None, 401), (issuer.token("openid profile"), 403),
                          (issuer.token("dicomweb.read"), 200)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        head = httpx.head(server.base_url + QIDO, headers=headers)
        assert head.status_code == _get(server, token).status_code == status, token
        assert head.headers.get("www-authenticate") == \
            _get(server, token).headers.get("www-authenticate")
    assert httpx.delete(server.base_url + QIDO).status_code == 405


def _segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_bad_header_is_a_401_in_the_audit_trail(server: PasserelleProcess,
                                                  issuer: LocalIssuer) -> None:
    _, payload, signature = issuer.token().split(".")
    tokens = {
        "ES256 header on the RSA key": issuer.token(kid="rsa-1", signed_by="ec-1"),
        "RS256 header on the EC key": issuer.token(kid="ec-1", signed_by="rsa-1"),
        "header not JSON": f"{_segment(b'{alg: RS256')}.{payload}.{signature}",
        "header not an object": f"{_segment(b'[1]')}.{payload}.{signature}",
        "kid not a string": f"{_segment(json.dumps({'alg': 'RS256', 'kid': ['rsa-1']}).encode())}"
                            f".{payload}.{signature}",
    }
    paths = {name: f"/dicom-web/studies/1.2.826.0.1.16.{n}" for n, name in enumerate(tokens)}
    for n, (name, token) in enumerate(tokens.items()):
        # Each from a loopback address of its own: the trail writes the first failure of a
        # client in full and counts the others (tests/test_audit_flood.py).
        with httpx.Client(transport=httpx.HTTPTransport(local_address=f"127.0.1.{n + 1}")
                          ) as client:
            response = client.get(server.base_url + paths[name],
                                  headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, name
        assert 'error="invalid_token"' in response.headers["www-authenticate"], name
        assert "Traceback" not in response.text


    def refused() -> set[str]:
        """The paths of the User Authentication failures in the trail so far."""
        events = (m["EventIdentification"] for m in read_events(server.data_dir / "audit"))
        return {e.get("EventOutcomeDescription", "") for e in events
                if e["EventID"]["csd-code"] == "110114" and e["EventOutcomeIndicator"] == "4"}
    wait_for(lambda: all(any(path in detail for detail in refused())
                         for path in paths.values()), 10, "a User Authentication event each")


def test_the_keys_follow_the_jwks(server: PasserelleProcess, issuer: LocalIssuer) -> None:
    assert _get(server, issuer.token()).status_code == 200
    assert _get(server, issuer.token(kid="rsa-0")).status_code == 200
    issuer.retire("rsa-0")
    issuer.add_key("rsa-2", "RS256")
    time.sleep(5.5)  # the JWKS is fetched again for an unknown key id, at most every 5 s
    before = issuer.jwks_requests
    assert _get(server, issuer.token(kid="rsa-2")).status_code == 200
    assert issuer.jwks_requests == before + 1
    assert _get(server, issuer.token(kid="rsa-2")).status_code == 200
    assert issuer.jwks_requests == before + 1  # cached
    retired = _get(server, issuer.token(kid="rsa-0"))  # trusted until that refetch
    assert retired.status_code == 401
    assert 'error="invalid_token"' in retired.headers["www-authenticate"]


def test_a_hanging_jwks_holds_no_valid_request(server: PasserelleProcess,
                                               issuer: LocalIssuer) -> None:
    assert _get(server, issuer.token()).status_code == 200  # its key is known
    issuer.add_key("attacker", "RS256", publish=False)
    time.sleep(5.5)  # past the cooldown of the last fetch: an unknown key id fetches again
    before = issuer.jwks_requests

    def attack() -> int:
        """A token naming a key id no JWKS lists: its status (once the fetch gave up)."""
        token = issuer.token(kid=uuid.uuid4().hex, signed_by="attacker")
        return httpx.get(server.base_url + QIDO, timeout=60,
                         headers={"Authorization": f"Bearer {token}"}).status_code

    with issuer.hanging(), ThreadPoolExecutor(45) as pool:
        unknown = [pool.submit(attack) for _ in range(45)]
        wait_for(lambda: issuer.jwks_requests > before, 10, "the JWKS fetch")
        time.sleep(0.5)  # the others arrive while it hangs
        valid = httpx.get(server.base_url + QIDO, timeout=5,
                          headers={"Authorization": f"Bearer {issuer.token()}"})
        assert valid.status_code == 200
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
        statuses = [future.result() for future in unknown]
    assert set(statuses) <= {401, 503}, statuses  # waited for the failed fetch, or refused
    assert 503 in statuses
    assert issuer.jwks_requests == before + 1  # one fetch at a time, none in the cooldown
    assert attack() == 401  # in the cooldown after the failure: at once
    assert issuer.jwks_requests == before + 1
    assert server.metric("passerelle_jwks_fetches_total", result="failed") >= 1


def test_allowlist_and_protected_metrics(tmp_path: Path, issuer: LocalIssuer) -> None:
    with PasserelleProcess(tmp_path / "data", **issuer.settings(),
                           auth_allowed_subjects="consumer-gateway",
                           metrics_require_auth="true") as server:
        assert _get(server, issuer.token()).status_code == 403  # sub not in the allowlist
        assert _get(server, issuer.token(sub=None, client_id="consumer-gateway")
                    ).status_code == 200
        # A token whose subject reads like a certificate identity is still a token subject.
        impostor = issuer.token("dicomweb.read passerelle.admin", sub="certificate:anyone")
        assert _get(server, impostor).status_code == 403
        assert httpx.post(f"{server.base_url}/admin/studies/1.2.3/publish",
                          headers={"Authorization": f"Bearer {impostor}"}).status_code == 403
        assert _get(server, None, "/metrics").status_code == 401
        assert _get(server, issuer.token("passerelle.admin", sub="consumer-gateway"),
                    "/metrics").status_code == 200
        assert _get(server, None, "/health").status_code == 200


def test_no_authentication_only_on_loopback(tmp_path: Path, issuer: LocalIssuer) -> None:
    exposed = PasserelleProcess(tmp_path / "exposed", http_host="0.0.0.0")
    with pytest.raises(RuntimeError, match="exited with 1") as refused:
        exposed.start()
    assert "http_host 0.0.0.0 is reachable from other machines but no authentication" \
        in str(refused.value)
    with PasserelleProcess(tmp_path / "protected", http_host="0.0.0.0",
                           **issuer.settings()) as protected:
        assert _get(protected, None).status_code == 401
    with PasserelleProcess(tmp_path / "open", http_host="0.0.0.0",
                           allow_unauthenticated="true") as opened:
        assert _get(opened, None).status_code == 200


def test_a_jwks_nested_past_the_parser_is_a_failed_fetch(server: PasserelleProcess,
                                                         issuer: LocalIssuer) -> None:
    assert _get(server, issuer.token()).status_code == 200  # the keys are known
    issuer.add_key("unlisted", "RS256", publish=False)
    issuer.body = b"[" * 400_000 + b"]" * 400_000  # 800 KB: under the 1 MiB cap
    try:
        time.sleep(5.5)  # past the cooldown of the last fetch
        token = issuer.token(kid="unlisted", signed_by="unlisted")
        assert _get(server, token).status_code == 503  # the fetch failed, cleanly
    finally:
        issuer.body = None
    assert _get(server, issuer.token()).status_code == 200  # known keys still trusted
    assert "RecursionError" not in server.log() and "never retrieved" not in server.log()
    assert "cannot fetch the issuer's keys" in server.log()
