"""Bearer-token access control of a running service, attacked with the tokens a client could
forge or misuse, against a JWKS served by a local issuer."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.issuer import LocalIssuer
from tests.processes import PasserelleProcess

QIDO = "/dicom-web/studies"


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer() as local:
        yield local


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           issuer: LocalIssuer) -> Iterator[PasserelleProcess]:
    with PasserelleProcess(tmp_path_factory.mktemp("auth") / "data",
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


def test_a_rotated_key_is_fetched_when_first_seen(server: PasserelleProcess,
                                                  issuer: LocalIssuer) -> None:
    assert _get(server, issuer.token()).status_code == 200
    issuer.add_key("rsa-2", "RS256")
    time.sleep(5.5)  # the JWKS is fetched again for an unknown key id, at most every 5 s
    before = issuer.jwks_requests
    assert _get(server, issuer.token(kid="rsa-2")).status_code == 200
    assert issuer.jwks_requests == before + 1
    assert _get(server, issuer.token(kid="rsa-2")).status_code == 200
    assert issuer.jwks_requests == before + 1  # cached


def test_allowlist_and_protected_metrics(tmp_path: Path, issuer: LocalIssuer) -> None:
    with PasserelleProcess(tmp_path / "data", **issuer.settings(),
                           auth_allowed_subjects="consumer-gateway",
                           metrics_require_auth="true") as server:
        assert _get(server, issuer.token()).status_code == 403  # sub not in the allowlist
        assert _get(server, issuer.token(sub=None, client_id="consumer-gateway")
                    ).status_code == 200
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
