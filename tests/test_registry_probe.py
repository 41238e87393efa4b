"""The live probe of the registry (gateway.publication.registry_probe) on the health page:
bounded, cached per process, with the publisher's TLS settings; against the local registry,
through a proxy that counts the requests, over mutual TLS and against a closed port."""

import contextlib
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.publication.registry_probe import MAX_ANSWER_BYTES, PROBE_DEADLINE, RegistryProbe
from tests.certificates import make_pki
from tests.faulty_proxy import FaultyProxy
from tests.inprocess import InProcessService
from tests.processes import RegistryProcess, free_port


def _probe(handler: object, every: float = 30.0) -> RegistryProbe:
    return RegistryProbe("http://registry.test/fhir/", every=every,
                         transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


def test_a_registry_answering_is_reachable_and_asked_once_per_period() -> None:
    asked: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        return httpx.Response(200, json={"resourceType": "CapabilityStatement"})

    probe = _probe(answer)
    first = probe.check()
    assert (first.reachable, first.ok, first.status, first.error) == (True, True, 200, "")
    assert first.round_trip_ms is not None and first.round_trip_ms >= 0
    assert probe.check() is first and len(asked) == 1  # cached
    assert str(asked[0].url) == "http://registry.test/fhir/metadata"
    assert asked[0].headers["accept"] == "application/fhir+json"
    assert asked[0].headers["accept-encoding"] == "identity"
    again = _probe(answer, every=0)
    again.check()
    again.check()
    assert len(asked) == 3


def test_a_refusal_is_reachable_with_its_reason_read_within_bounds() -> None:
    sent = []

    def endless() -> Iterator[bytes]:
        yield b'{"resourceType": "OperationOutcome", "issue": ['
        while True:
            sent.append(1)
            yield b" " * 4096

    outcome = json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "security", "diagnostics": "no token"}]}).encode()
    # Streamed, as a network answer is (a body given whole is read before the probe sees it).
    refused = _probe(lambda request: httpx.Response(401, content=iter([outcome]))).check()
    assert (refused.reachable, refused.ok, refused.status) == (True, False, 401)
    assert refused.problem == "error security: no token"
    huge = _probe(lambda request: httpx.Response(503, content=endless())).check()
    assert (huge.status, huge.problem) == (503, "Service Unavailable")
    assert len(sent) * 4096 <= MAX_ANSWER_BYTES + 4096  # the rest was never read


def test_no_answer_is_unreachable_with_the_reason_as_text() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    down = _probe(refuse).check()
    assert (down.reachable, down.status, down.error) == (
        False, None, "cannot connect: [Errno 111] Connection refused")
    assert _probe(hang).check().error == "no answer within 3 s (timed out)"
    assert RegistryProbe("registry.example").check().error.startswith(
        "connection failed: Request URL is missing an 'http://' or 'https://' protocol")
    assert RegistryProbe("http://[::1").check().error.startswith("invalid registry URL: ")
    tries = []

    def unusable() -> None:
        tries.append(1)
        raise OSError("cannot read /etc/passerelle/client.pem")

    probe = RegistryProbe("https://registry.test/fhir", unusable, every=0)
    assert probe.check().error == ("registry TLS settings unusable: cannot read"
                                   " /etc/passerelle/client.pem")
    probe.check()
    assert len(tries) == 2  # tried again, not kept


def _panel(service: InProcessService, language: str = "fr") -> str:
    response = service.get("/ui/health?panel=1", headers={"Accept-Language": language})
    assert response.status_code == 200
    [probed] = re.findall(r'<dd id="registry-probe"[^>]*>.*?</dd>', response.text)
    return probed


def test_the_health_page_shows_the_local_registry_reachable_probed_once(
        tmp_path: Path) -> None:
    with RegistryProcess(tmp_path / "registry") as registry, \
            FaultyProxy(registry.http_port) as proxy, \
            InProcessService(tmp_path / "data", registry_url=proxy.url) as service:
        shown = _panel(service)
        assert 'data-reachable="yes"' in shown and "joignable</span>: HTTP 200, " in shown
        assert re.search(r", \d+ ms \(vérifié le \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)", shown)
        assert "HTTP 200" in _panel(service, "en") and "checked " in _panel(service, "en")
        assert proxy.requests == ["GET /fhir/metadata"]  # three refreshes, one probe
        proxy.mode = "503"  # another process probes now: its answer, as text
        with InProcessService(tmp_path / "other", registry_url=proxy.url) as other:
            shown = _panel(other)
            assert "répond en erreur</span>: HTTP 503 error transient: under maintenance" in shown


def test_the_health_page_shows_a_closed_port_unreachable_with_the_reason(
        tmp_path: Path) -> None:
    with InProcessService(tmp_path / "data",
                          registry_url=f"http://127.0.0.1:{free_port()}/fhir") as service:
        shown = _panel(service)
        assert 'data-reachable="no"' in shown and "injoignable</span>: cannot connect:" in shown
        assert "Connection refused" in shown
    with InProcessService(tmp_path / "none") as service:
        assert "non configuré" in _panel(service)


@pytest.mark.parametrize("with_certificate", [True, False])
def test_the_probe_uses_the_publisher_tls_settings(tmp_path: Path,
                                                   with_certificate: bool) -> None:
    pki = make_pki(tmp_path / "pki")
    certificate = {"registry_client_cert_file": str(pki.client_cert),
                   "registry_client_key_file": str(pki.client_key)} if with_certificate else {}
    registry_tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                    "--tls-client-ca", str(pki.ca))
    client = ssl.create_default_context(cafile=pki.ca)
    client.load_cert_chain(pki.client_cert, pki.client_key)
    with RegistryProcess(tmp_path / "registry", tls_arguments=registry_tls,
                         tls=client) as registry, InProcessService(
            tmp_path / "data", registry_url=registry.fhir_url, registry_ca_file=str(pki.ca),
            **certificate) as service:
        shown = _panel(service)
    if with_certificate:
        assert "HTTP 200" in shown
    else:  # the registry closes the connection of a client without a certificate
        assert 'data-reachable="no"' in shown and "connection failed: " in shown, shown


def _trickling_registry() -> tuple[socket.socket, threading.Event]:
    """A registry that sends its answer's head one byte a second, until ``stop`` is set."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = server.accept()
            with connection:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" * 100:
                    if stop.wait(1):
                        return
                    connection.sendall(bytes([byte]))

    threading.Thread(target=serve, daemon=True).start()
    return server, stop


def test_a_registry_answering_a_byte_a_second_is_cut_at_the_deadline_and_holds_nobody(
        ) -> None:
    server, stop = _trickling_registry()
    try:
        probe = RegistryProbe(f"http://127.0.0.1:{server.getsockname()[1]}/fhir", every=0)
        started = time.monotonic()
        first = probe.check()
        waited = time.monotonic() - started
        assert waited < PROBE_DEADLINE + 1 and not first.reachable
        assert f"no complete answer within {PROBE_DEADLINE:g} s" in first.error
        # The probe is still under way: the next callers get the last result at once.
        started = time.monotonic()
        assert [probe.check() for _ in range(20)] == [first] * 20
        assert time.monotonic() - started < 0.5
    finally:
        stop.set()
        server.close()
