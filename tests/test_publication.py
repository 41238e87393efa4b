"""Publication end to end: ``passerelle serve`` publishing to ``passerelle registry`` (both
real processes), through a proxy that fails on demand. Exactly-once through outages, kills
and lost answers; permanent refusals surfaced; replacement, withdrawal, confidentiality."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from storage.database import Database
from storage.index import Index
from storage.outbox import Outbox, Publication, State
from tests.faulty_proxy import FaultyProxy
from tests.inprocess import InProcessService
from tests.processes import PasserelleProcess, RegistryProcess, free_port, wait_for
from tests.scu import send
from tests.synthetic import national_ct_slice

FAST = {"stable_seconds": "1", "publish_retry_seconds": "0.2", "publish_retry_max_seconds": "1",
        "registry_timeout": "2", "order_issuer_oid": "1.2.250.1.999.1.1.3"}


def _send(server: PasserelleProcess, study: str, series: str, number: int,
          **attributes: object) -> None:
    ds = national_ct_slice(study, series, 1, number, **attributes)
    assert send(server.dicom_port, ds)[0] == 0x0000


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(tmp_path / "registry") as process:
        yield process


class _Rows:
    """The outbox of a service's index, read as the service writes it; ``fast``: the
    service settings of these tests, on that index."""

    def __init__(self, data_dir: Path, database_url: str) -> None:
        self.index = Index(Database(database_url) if database_url else data_dir / "index.sqlite")
        self.outbox = Outbox(self.index)
        self.fast = {**FAST, "database_url": database_url}

    def all(self) -> list[Publication]:
        return self.outbox.listing()

    def wait(self, predicate: object, what: str, timeout: float = 30) -> list[Publication]:
        wait_for(lambda: predicate(self.all()), timeout, what)  # type: ignore[operator]
        return self.all()


@pytest.fixture
def rows(tmp_path: Path, database_url: str) -> Iterator[_Rows]:
    """On SQLite the default index (the data dir's file), else the PostgreSQL database."""
    (tmp_path / "data").mkdir()
    reader = _Rows(tmp_path / "data", "" if database_url.startswith("sqlite") else database_url)
    yield reader
    reader.index.close()


def _acknowledged(count: int) -> object:
    return lambda rows: sum(r.state is State.ACKNOWLEDGED for r in rows) >= count


def test_outages_then_recovery_publish_exactly_once(tmp_path: Path, rows: _Rows) -> None:
    registry_port = free_port()
    proxy = FaultyProxy(upstream=registry_port)
    study = generate_uid()
    with PasserelleProcess(tmp_path / "data", registry_url=proxy.url, **rows.fast) as server:
        _send(server, study, generate_uid(), 1)
        # 1. Nothing listens: connection refused, never delivered, the row stays pending.
        # (Between attempts: during one the row is `sent` for the time of the request.)
        rows.wait(lambda r: r and r[0].attempts >= 2 and "unreachable" in r[0].last_error
                  and r[0].state is State.PENDING, "retries against a registry that is down")
        with proxy:
            proxy.mode = "503"
            rows.wait(lambda r: "HTTP 503" in r[0].last_error, "a 503")
            assert rows.all()[0].state is State.SENT  # 5xx: maybe received, look up first
            proxy.mode = "hang"
            rows.wait(lambda r: "no answer" in r[0].last_error, "a timeout", timeout=40)
            with RegistryProcess(tmp_path / "registry", port=registry_port) as registry:
                proxy.mode = "forward"
                [row] = rows.wait(_acknowledged(1), "the acknowledgement", timeout=40)
                [document] = registry.documents(study)
        assert f"DocumentReference/{document['id']}" == row.document_id
        assert document["masterIdentifier"]["value"] == f"urn:oid:{row.kos_uid}"
        assert "GET /fhir/DocumentReference?identifier=" + \
            "urn%3Aietf%3Arfc%3A3986%7Curn%3Aoid%3A" + row.kos_uid in proxy.requests
        assert server.metric("passerelle_publications", state="acknowledged") == 1
        assert server.metric("passerelle_publication_attempts_total", action="publish",
                             result="retry") >= 3
        kos = (tmp_path / "data" / "manifests" / study / f"{row.kos_uid}.dcm").read_bytes()
        assert len(kos) == document["content"][0]["attachment"]["size"]


def test_a_refusal_fails_for_good_with_the_registry_reason(tmp_path: Path, rows: _Rows,
                                                          registry: RegistryProcess) -> None:
    study = generate_uid()
    with PasserelleProcess(tmp_path / "data", registry_url=registry.fhir_url,
                           **rows.fast) as server:
        _send(server, study, generate_uid(), 1, Modality="OT")  # no acquisition modality
        [row] = rows.wait(lambda r: r and r[0].state is State.FAILED, "a refusal")
        assert row.last_error.startswith("HTTP 422: error required ImagingModalityCode: ")
        assert json.loads(row.response)["resourceType"] == "OperationOutcome"
        listed = server.cli("outbox").stdout
        assert "failed" in listed and "ImagingModalityCode" in listed
        assert server.metric("passerelle_publications", state="failed") == 1
        assert server.metric("passerelle_publication_attempts_total", action="publish",
                             result="rejected") == 1
        assert registry.documents(study) == []
        assert server.cli("outbox", "retry", str(row.id)).returncode == 0
        wait_for(lambda: server.metric("passerelle_publication_attempts_total",
                                       action="publish", result="rejected") == 2, 30,
                 "a second refusal")
        assert rows.all()[0].state is State.FAILED


@pytest.mark.parametrize("attributes, reason", [
    ({"IssuerOfAccessionNumberSequence": None},
     "accession number 'ACC-2026-000457' has no assigning authority OID (none in the "
     "instances): set accession_issuer_oid"),
    ({"AccessionNumber": ""}, "the study has no Accession Number"),
    ({"StudyDate": "", "StudyTime": ""}, "the study has no Study Date"),
])
def test_what_the_registry_cannot_index_is_refused_before_sending(
        tmp_path: Path, rows: _Rows, registry: RegistryProcess, attributes: dict,
        reason: str) -> None:
    study = generate_uid()
    ds = national_ct_slice(study, generate_uid(), 1, 1)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    with PasserelleProcess(tmp_path / "data", registry_url=registry.fhir_url,
                           **rows.fast) as server:
        assert send(server.dicom_port, ds)[0] == 0x0000
        [row] = rows.wait(lambda r: r and r[0].state is State.FAILED, "a refusal")
        assert row.last_error.startswith(reason), row.last_error
        assert server.metric("passerelle_publication_attempts_total", action="publish",
                             result="rejected") == 1
        assert reason in server.cli("outbox").stdout
        assert registry.documents(study) == []


@pytest.mark.parametrize("setting, keyword", [
    ("accession_issuer_oid", "IssuerOfAccessionNumberSequence"),
    ("patient_id_issuer_oid", "IssuerOfPatientIDQualifiersSequence"),
])
def test_a_refusal_fixed_in_the_settings_is_published_on_retry(
        tmp_path: Path, rows: _Rows, registry: RegistryProcess, setting: str,
        keyword: str) -> None:
    """Refused for an issuer the settings can give; the operator sets it, restarts and
    retries: what is sent is the manifest built with it (a refused one is never kept)."""
    study, oid = generate_uid(), "1.2.250.1.999.1.1.7"
    ds = national_ct_slice(study, generate_uid(), 1, 1, ins=setting != "patient_id_issuer_oid")
    if setting == "accession_issuer_oid":
        del ds.IssuerOfAccessionNumberSequence
    manifests = tmp_path / "data" / "manifests"
    with PasserelleProcess(tmp_path / "data", registry_url=registry.fhir_url,
                           **rows.fast) as server:
        assert send(server.dicom_port, ds)[0] == 0x0000
        [row] = rows.wait(lambda r: r and r[0].state is State.FAILED, "the refusal")
        assert row.last_error.endswith(f"set {setting}"), row.last_error
    assert list(manifests.rglob("*.dcm")) == []
    with PasserelleProcess(tmp_path / "data", registry_url=registry.fhir_url,
                           **{**rows.fast, setting: oid}) as server:
        assert server.cli("outbox", "retry", str(row.id)).returncode == 0
        [row] = rows.wait(_acknowledged(1), "the publication after the fix")
    [kept] = manifests.rglob("*.dcm")
    assert kept.name == f"{row.kos_uid}.dcm"
    assert dcmread(kept)[keyword][0].UniversalEntityID == oid


def test_a_400_fails_until_retried_after_the_fix(tmp_path: Path, rows: _Rows,
                                                 registry: RegistryProcess) -> None:
    study = generate_uid()
    with FaultyProxy(upstream=registry.http_port) as proxy, PasserelleProcess(
            tmp_path / "data", registry_url=proxy.url, **rows.fast) as server:
        proxy.mode = "400"
        _send(server, study, generate_uid(), 1)
        [row] = rows.wait(lambda r: r and r[0].state is State.FAILED, "the refusal")
        assert row.last_error == "HTTP 400: error invalid: unknown assigning authority"
        assert row.attempts == 1  # a refusal is not retried by itself
        proxy.mode = "forward"  # the registry side was fixed
        assert server.cli("outbox", "retry", str(row.id)).returncode == 0
        [row] = rows.wait(_acknowledged(1), "the publication after the retry")
        assert len(registry.documents(study)) == 1


def test_a_kill_between_send_and_acknowledgement_makes_no_duplicate(
        tmp_path: Path, rows: _Rows, registry: RegistryProcess) -> None:
    study = generate_uid()
    with FaultyProxy(upstream=registry.http_port) as proxy:
        proxy.mode = "lose-answer"
        server = PasserelleProcess(tmp_path / "data", registry_url=proxy.url,
                                   **{**rows.fast, "registry_timeout": "30"}).start()
        _send(server, study, generate_uid(), 1)
        wait_for(lambda: len(registry.documents(study)) == 1, 30, "the registered document")
        assert rows.all()[0].state is State.SENT
        server.stop(9)  # SIGKILL while waiting for the answer
        proxy.mode = "forward"
        posts = proxy.requests.count("POST /fhir")
        with PasserelleProcess(tmp_path / "data", registry_url=proxy.url, **rows.fast):
            [row] = rows.wait(_acknowledged(1), "the acknowledgement after restart")
        assert proxy.requests.count("POST /fhir") == posts == 1
        [document] = registry.documents(study)
        assert row.document_id == f"DocumentReference/{document['id']}"
        assert "earlier attempt" in row.response


def test_replacement_confidentiality_withdrawal_and_republication(
        tmp_path: Path, rows: _Rows, registry: RegistryProcess) -> None:
    study, series = generate_uid(), generate_uid()
    with PasserelleProcess(tmp_path / "data", registry_url=registry.fhir_url,
                           **rows.fast) as server:
        _send(server, study, series, 1)
        [first] = rows.wait(_acknowledged(1), "the first publication")
        _send(server, study, series, 2)  # a late instance
        second = rows.wait(_acknowledged(2), "the replacement")[1]
        assert second.replaces_kos_uid == first.kos_uid != second.kos_uid
        documents = {f"DocumentReference/{d['id']}": d for d in registry.documents(study)}
        assert documents[first.document_id]["status"] == "superseded"
        assert documents[second.document_id]["relatesTo"] == [
            {"code": "replaces", "target": {"reference": first.document_id}}]
        assert [d["id"] for d in registry.documents(study, "current")] == [
            second.document_id.split("/")[1]]

        queued = server.cli("confidentiality", study, "--level", "R", "--mask", "MASQUE_PS")
        assert queued.returncode == 0, queued.stderr
        rows.wait(_acknowledged(3), "the confidentiality update")
        [current] = registry.documents(study, "current")
        labels = [c["code"] for label in current["securityLabel"] for c in label["coding"]]
        assert labels == ["R", "R", "MASQUE_PS"]

        assert server.cli("unpublish", study).returncode == 0
        rows.wait(_acknowledged(4), "the withdrawal")
        assert registry.documents(study, "current") == []

        response = httpx.post(f"{server.base_url}/admin/studies/{study}/publish")
        assert response.status_code == 202
        assert response.json()["publication"]["state"] == "pending"
        fifth = rows.wait(_acknowledged(5), "the republication")[4]
        assert fifth.kos_uid not in (first.kos_uid, second.kos_uid)  # a new uniqueId
        [current] = registry.documents(study, "current")
        assert "relatesTo" not in current  # the withdrawn one is not replaced, it stays so
        assert "MASQUE_PS" in json.dumps(current["securityLabel"])


def test_admin_requests_that_cannot_be_queued(web: InProcessService) -> None:
    # In-process: the validation of the admin API, nothing to publish.
    study = generate_uid()
    assert web.ingest(national_ct_slice(study, generate_uid(), 1, 1)).accepted
    for path, body, status in [
            ("/admin/studies/1.2.3.4/publish", None, 404),
            (f"/admin/studies/{study}/delete", None, 404),
            (f"/admin/studies/{study}/confidentiality", b'{"level": "X"}', 400),
            (f"/admin/studies/{study}/confidentiality", b'{"masking": ["NOPE"]}', 400),
            (f"/admin/studies/{study}/confidentiality", b"[", 400)]:
        response = web.post(path, content=body)
        assert response.status_code == status, path
        assert response.json()["error"]


def test_unpublishing_what_was_never_published_fails_clearly(tmp_path: Path, rows: _Rows,
                                                            registry: RegistryProcess) -> None:
    study = generate_uid()
    with PasserelleProcess(tmp_path / "data", registry_url=registry.fhir_url,
                           **{**rows.fast, "stable_seconds": "3600"}) as server:
        _send(server, study, generate_uid(), 1)
        assert server.cli("unpublish", study).returncode == 0
        [row] = rows.wait(lambda r: r and r[0].state is State.FAILED, "the refusal")
        assert "no published manifest" in row.last_error
        missing = server.cli("publish", "1.2.3.4")
        assert missing.returncode == 1 and "no such study" in missing.stderr
