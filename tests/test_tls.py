"""TLS on both listeners, with certificates the test makes: HTTPS (TLS >= 1.2, optional
client certificates) and DICOM over TLS, checked by real clients (httpx, pynetdicom, dcmtk)."""

import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from storage.index import Index
from storage.outbox import Outbox, Publication, State
from tests.certificates import Pki, make_pki
from tests.processes import PasserelleProcess, RegistryProcess, wait_for
from tests.scu import send
from tests.synthetic import ct_slice, national_ct_slice


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client(pki: Pki, with_certificate: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if with_certificate:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def _tls(pki: Pki) -> dict[str, str]:
    return {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key)}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_https_only_and_at_least_tls_1_2(tmp_path: Path, pki: Pki) -> None:
    with PasserelleProcess(tmp_path / "data", tls=_client(pki), **_tls(pki)) as server:
        assert server.base_url.startswith("https://")
        response = httpx.get(f"{server.base_url}/dicom-web/studies", verify=_client(pki))
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{server.http_port}/health")
        tls12 = _client(pki)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert httpx.get(f"{server.base_url}/health", verify=tls12).status_code == 200
        old = _client(pki)  # a client willing to speak TLS 1.0/1.1, which we must refuse
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.base_url}/health", verify=old)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust our CA
            httpx.get(f"{server.base_url}/health", verify=ssl.create_default_context())


def test_client_certificates_when_required(tmp_path: Path, pki: Pki) -> None:
    settings = {**_tls(pki), "tls_client_ca_file": str(pki.ca)}
    with PasserelleProcess(tmp_path / "data", tls=_client(pki, with_certificate=True),
                           **settings) as server:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.base_url}/health", verify=_client(pki)).raise_for_status()
        assert httpx.get(f"{server.base_url}/health",
                         verify=_client(pki, with_certificate=True)).status_code == 200


def test_dicom_over_tls(tmp_path: Path, pki: Pki) -> None:
    # A grace longer than the stop's 30 s timeout: the connections still negotiating when
    # the service stops (the plain association refused below) must not be waited for.
    with PasserelleProcess(tmp_path / "data", tls=_client(pki), dicom_tls="true",
                           max_associations_per_client="1", shutdown_grace_seconds="120",
                           **_tls(pki)) as server:
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="PASSERELLE",
                             tls_args=(_client(pki), "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4)
        assert assoc.send_c_store(ds).Status == 0
        surplus = ae.associate("127.0.0.1", server.dicom_port, ae_title="PASSERELLE",
                               tls_args=(_client(pki), "127.0.0.1"))
        assert surplus.is_rejected  # over TLS too, with its reason: local-limit-exceeded
        assert surplus.acceptor.primitive.diagnostic == 2
        assoc.release()
        plain = ae.associate("127.0.0.1", server.dicom_port, ae_title="PASSERELLE")
        assert not plain.is_established
        wait_for(lambda: server.metric("passerelle_dicom_associations_open") == 0, 10,
                 "the connections to close")  # before echoscu's, under the limit of 1
        echo = subprocess.run(["echoscu", "--anonymous-tls", "+cf", str(pki.ca),
                               "-aec", "PASSERELLE", "127.0.0.1", str(server.dicom_port)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert echo.returncode == 0, echo.stderr
        stored = httpx.get(f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/metadata",
                           verify=_client(pki))
        assert stored.json()[0]["00080018"]["Value"] == [ds.SOPInstanceUID]


def test_a_client_that_never_finishes_its_handshake_blocks_no_one(tmp_path: Path,
                                                                  pki: Pki) -> None:
    # A grace longer than the stop's 30 s timeout: the silent connection, still open when
    # the service stops, has nothing to finish and must not be waited for.
    with PasserelleProcess(tmp_path / "data", tls=_client(pki), dicom_tls="true",
                           acse_timeout="60", network_timeout="60",
                           shutdown_grace_seconds="120", **_tls(pki)) as server, \
            socket.create_connection(("127.0.0.1", server.dicom_port)):
        # That connection never starts its handshake; a real TLS peer still gets in at once.
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="PASSERELLE",
                             tls_args=(_client(pki), "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - started < 10


def test_a_consumer_gateway_known_by_its_certificate(tmp_path: Path, pki: Pki) -> None:
    settings = {**_tls(pki), "tls_client_ca_file": str(pki.ca),
                "auth_client_certificates": "client.test=dicomweb.read"}
    client = _client(pki, with_certificate=True)
    with PasserelleProcess(tmp_path / "data", tls=client, **settings) as server:
        assert httpx.get(f"{server.base_url}/dicom-web/studies", verify=client
                         ).status_code == 200
        stow = httpx.post(f"{server.base_url}/dicom-web/studies", verify=client, content=b"",
                          headers={"Content-Type": "multipart/related; type=application/dicom"})
        assert stow.status_code == 403  # the certificate grants read only
        audit = server.cli("audit").stdout
        assert "certificate:client.test" in audit


def _outbox(server: PasserelleProcess) -> list[Publication]:
    """The outbox rows, read from the index as the service writes it (a poll costs no
    ``passerelle outbox`` process)."""
    index = Index(server.data_dir / "index.sqlite")
    try:
        return Outbox(index).listing()
    finally:
        index.close()


def test_publishes_to_a_registry_that_requires_a_client_certificate(tmp_path: Path,
                                                                   pki: Pki) -> None:
    registry_tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                    "--tls-client-ca", str(pki.ca))
    fast = {"stable_seconds": "1", "publish_retry_seconds": "0.2",
            "publish_retry_max_seconds": "0.5", "registry_timeout": "5",
            "order_issuer_oid": "1.2.250.1.999.1.1.3"}
    certificate = {"registry_client_cert_file": str(pki.client_cert),
                   "registry_client_key_file": str(pki.client_key)}
    study = generate_uid()
    with RegistryProcess(tmp_path / "registry", tls_arguments=registry_tls,
                         tls=_client(pki, with_certificate=True)) as registry:
        url = {"registry_url": registry.fhir_url}
        # The registry's certificate is not trusted (system CAs only): nothing is sent.
        with PasserelleProcess(tmp_path / "data", **url, **certificate, **fast) as server:
            assert send(server.dicom_port, national_ct_slice(study, generate_uid(), 1, 1)
                        )[0] == 0x0000
            wait_for(lambda: _outbox(server) and "CERTIFICATE_VERIFY_FAILED" in
                     _outbox(server)[0].last_error, 30, "a refused registry certificate")
        # Trusted registry, but no client certificate: the registry closes the connection.
        with PasserelleProcess(tmp_path / "data", **url, **fast,
                               registry_ca_file=str(pki.ca)) as server:
            attempts = _outbox(server)[0].attempts
            wait_for(lambda: _outbox(server)[0].attempts >= attempts + 2, 30,
                     "attempts without a client certificate")
            [row] = _outbox(server)
            assert row.state is not State.ACKNOWLEDGED
            assert row.last_error.startswith("registry connection failed")
        assert registry.documents(study, "current") == []
        # Both: published once.
        with PasserelleProcess(tmp_path / "data", **url, **certificate, **fast,
                               registry_ca_file=str(pki.ca)) as server:
            wait_for(lambda: _outbox(server)[0].state is State.ACKNOWLEDGED, 30,
                     "the acknowledgement")
        assert len(registry.documents(study, "current")) == 1
        with pytest.raises(httpx.HTTPError):  # the registry does require the certificate
            httpx.get(f"{registry.fhir_url}/metadata", verify=_client(pki)).raise_for_status()


@pytest.mark.parametrize("settings, named", [
    ({"registry_url": "https://registry.example/fhir", "registry_ca_file": "/nonexistent.pem"},
     "/nonexistent.pem: No such file"),
    ({"tls_cert_file": "/etc/hostname", "tls_key_file": "/etc/hostname"}, "/etc/hostname"),
])
def test_unusable_tls_files_stop_serve_naming_the_file(tmp_path: Path, settings: dict,
                                                       named: str) -> None:
    server = PasserelleProcess(tmp_path / "data", **settings)
    with pytest.raises(RuntimeError, match="exited with 1") as failure:
        server.start()
    assert f"cannot serve: TLS file(s) {named}" in str(failure.value)
    assert "Traceback" not in server.log()
