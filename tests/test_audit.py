"""The audit trail after a scripted session against a running service: exactly the expected
DICOM audit messages (PS3.15 A.5), durable in the JSON lines file, copied to syslog, and
listed by ``passerelle audit --study``; its rotation (in-process); user IDs that tell each kind
of identity apart."""

import base64
import json
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

from gateway.config import AuditSettings
from gateway.security.audit import (
    AuditEvent,
    AuditTrail,
    EventType,
    Outcome,
    audit_message,
    read_events,
)
from gateway.web.middleware.auth import Principal
from tests.certificates import make_pki
from tests.inprocess import InProcessService
from tests.issuer import LocalIssuer
from tests.processes import PasserelleProcess, RegistryProcess, free_port, wait_for
from tests.scu import associate, send
from tests.synthetic import national_ct_slice
from tests.syslog_collector import TlsSyslogCollector


def _summary(message: dict) -> tuple[str, str, str, str, str]:
    """(event code, action, outcome, who, study) of an audit message."""
    event = message["EventIdentification"]
    study = next((o["ParticipantObjectID"] for o in message["ParticipantObjectIdentification"]
                  if o["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"), "")
    return (event["EventID"]["csd-code"], event["EventActionCode"],
            event["EventOutcomeIndicator"], message["ActiveParticipant"][0]["UserID"], study)


def _query(message: dict) -> str:
    """The query of a Query message (PS3.15 A.5: base64 in ParticipantObjectQuery)."""
    return base64.b64decode(
        message["ParticipantObjectIdentification"][0]["ParticipantObjectQuery"]).decode()


def test_a_scripted_session_leaves_exactly_the_expected_events(tmp_path: Path) -> None:
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", free_port()))
    syslog.settimeout(5)
    study, series = generate_uid(), generate_uid()
    first = national_ct_slice(study, series, 1, 1)
    with LocalIssuer() as issuer, RegistryProcess(tmp_path / "registry") as registry, \
            PasserelleProcess(tmp_path / "data", **issuer.settings(),
                              registry_url=registry.fhir_url, stable_seconds="1",
                              allowed_calling_aets="MODALITY",
                              audit_syslog=f"127.0.0.1:{syslog.getsockname()[1]}",
                              order_issuer_oid="1.2.250.1.999.1.1.3") as server:
        for number, ds in enumerate((first, national_ct_slice(study, series, 1, 2)), 1):
            assert send(server.dicom_port, ds, calling="MODALITY")[0] == 0, number
        assert not associate(server.dicom_port, calling="INTRUDER").is_established
        wait_for(lambda: server.metric("passerelle_publications", state="acknowledged") == 1,
                 30, "the publication")
        reader = {"Authorization": f"Bearer {issuer.token('dicomweb.read')}"}
        base = f"{server.base_url}/dicom-web/studies"
        assert httpx.get(f"{base}?PatientID=PAT001", headers=reader).status_code == 200
        assert httpx.get(f"{base}/{study}", headers=reader).status_code == 200
        assert httpx.get(f"{base}/{study}/series/{series}/instances/{first.SOPInstanceUID}"
                         "/rendered", headers=reader).status_code == 200
        assert httpx.get(f"{base}/{study}").status_code == 401
        nobody = {"Authorization": f"Bearer {issuer.token('openid', sub='stranger')}"}
        assert httpx.get(f"{base}/{study}", headers=nobody).status_code == 403
        audit_cli = server.cli("audit", "--study", study)
    assert server.stop() == 0  # the trail is drained on the way out

    messages = list(read_events(tmp_path / "data" / "audit"))
    sub = "899700367909"
    assert Counter(map(_summary, messages)) == Counter([
        ("110104", "C", "0", "MODALITY", study),  # two associations, one study each
        ("110104", "C", "0", "MODALITY", study),
        ("110114", "E", "4", "INTRUDER", ""),  # calling AE not allowed
        ("110106", "R", "0", registry.fhir_url, study),  # the publication
        ("110112", "E", "0", sub, ""),  # QIDO
        ("110104", "R", "0", sub, study),  # WADO-RS retrieve
        ("110103", "R", "0", sub, study),  # rendered
        ("110114", "E", "4", "anonymous", ""),  # no token
        ("110104", "R", "4", "stranger", study),  # token without the read scope
    ])
    query = next(m for m in messages if m["EventIdentification"]["EventID"]["csd-code"]
                 == "110112")
    assert _query(query) == "PatientID=PAT001"
    retrieve = next(m for m in messages if _summary(m)[:3] == ("110104", "R", "0"))
    patients = [o["ParticipantObjectID"] for o in retrieve["ParticipantObjectIdentification"]
                if o["ParticipantObjectTypeCode"] == "1"]
    assert patients == ["PAT001"]
    assert retrieve["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"

    received = [syslog.recvfrom(65536)[0].decode() for _ in messages]
    assert all(line.startswith("<85>1 ") and " AUDIT - {" in line for line in received)
    syslog.close()
    assert audit_cli.returncode == 0
    assert sub in audit_cli.stdout and "stranger" in audit_cli.stdout


def test_the_trail_rotates_and_reads_back_in_order(tmp_path: Path) -> None:
    # In-process: the rotation is the trail's, whatever carried the requests.
    with InProcessService(tmp_path / "data", audit_max_bytes="2000",
                          audit_backups="50") as service:
        audit = tmp_path / "data" / "audit"
        for n in range(40):
            service.get(f"/dicom-web/studies?AccessionNumber=A{n}")
            # One event a batch (a batch is appended whole, then the file rotated), however
            # slow fsync is today.
            wait_for(lambda n=n: len(list(read_events(audit))) == n + 1, 10, f"event {n}")
    files = sorted((tmp_path / "data" / "audit").glob("audit.jsonl*"))
    assert len(files) > 3
    assert [_query(m) for m in read_events(tmp_path / "data" / "audit")] == [
        f"AccessionNumber=A{n}" for n in range(40)]


def test_a_reader_beside_the_writer_sees_each_message_once(tmp_path: Path) -> None:
    # `passerelle audit` reads while the service writes and rotates: every read is an ordered
    # run of the messages written, none twice, and no read fails on a file a rotation moved.
    settings = AuditSettings(audit_max_bytes=1500, audit_backups=400)
    trail = AuditTrail(tmp_path, "passerelle", lambda study: "", settings)
    written = 300

    def write() -> None:  # one event a batch, mostly: a batch is appended whole, then rotated
        for n in range(written):
            trail.record(AuditEvent(EventType.QUERY, "E", Outcome.SUCCESS, "reader-test",
                                    "127.0.0.1", query=f"n={n}"))
            time.sleep(0.002)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while writer.is_alive() or len(list(read_events(tmp_path))) < written:
            numbers = [int(_query(m)[2:]) for m in read_events(tmp_path)]
            assert numbers == list(range(len(numbers)))
    finally:
        writer.join()
        trail.close()
    assert len(list(tmp_path.glob("audit.jsonl.*"))) > 20


def test_syslog_over_tls_catches_up_after_the_collector_was_down(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    settings = {"audit_syslog": f"127.0.0.1:{port}", "audit_syslog_transport": "tls",
                "audit_syslog_ca_file": str(pki.ca), "tls_cert_file": str(pki.server_cert),
                "tls_key_file": str(pki.server_key)}
    https = ssl.create_default_context(cafile=pki.ca)
    # One HTTP worker: each has its own backlog, and the order checked is one process's.
    with PasserelleProcess(tmp_path / "data", tls=https, http_workers="1",
                           **settings) as server:
        studies = f"{server.base_url}/dicom-web/studies"
        for n in range(3):  # the collector is down: kept for later
            httpx.get(studies, params={"AccessionNumber": f"DOWN{n}"}, verify=https)
        wait_for(lambda: "audit syslog 127.0.0.1" in server.log(), 10, "a refused connection")
        with TlsSyslogCollector(port, pki.server_cert, pki.server_key, pki.ca) as collector:
            wait_for(lambda: len(collector.received) >= 3, 30, "the backlog")
            httpx.get(studies, params={"AccessionNumber": "UP"}, verify=https)
            wait_for(lambda: len(collector.received) >= 4, 30, "a live message")
    assert {sender for sender, _ in collector.received} == {"server.test"}  # mutual TLS
    queries = []
    for message in collector.messages():
        assert message.startswith("<85>1 ") and " PASSERELLE " in message
        queries.append(_query(json.loads(message.partition(" AUDIT - ")[2])))
    assert queries == ["AccessionNumber=DOWN0", "AccessionNumber=DOWN1", "AccessionNumber=DOWN2",
                       "AccessionNumber=UP"]
    assert queries == [_query(m) for m in read_events(tmp_path / "data" / "audit")]


def test_admin_listings_are_audited_as_queries(tmp_path: Path) -> None:
    with InProcessService(tmp_path / "data") as service:
        study = generate_uid()
        service.ingest(national_ct_slice(study, generate_uid(), 1, 1))
        assert service.get("/admin/studies").status_code == 200
        assert service.get(f"/admin/studies/{study}").status_code == 200
        assert service.get("/admin/outbox").status_code == 200
    # after close: the trail is written by a thread of its own
    events = [m for m in read_events(tmp_path / "data" / "audit")
              if m["EventIdentification"]["EventID"]["originalText"] == "Query"]
    assert len(events) == 3
    studies = [[o["ParticipantObjectID"] for o in m.get("ParticipantObjectIdentification", [])
                if o["ParticipantObjectIDTypeCode"].get("csd-code") == "110180"]
               for m in events]
    assert studies[1] == [study]


def test_user_ids_tell_a_certificate_from_a_token_subject() -> None:
    # A token whose subject reads like another kind of identity never shows as that kind.
    def shown(principal: Principal | str) -> str:
        event = AuditEvent(EventType.QUERY, "E", Outcome.SUCCESS, principal, "127.0.0.1")
        return audit_message(event, "PASSERELLE", "")["ActiveParticipant"][0]["UserID"]

    assert shown(Principal("certificate", "x")) == "certificate:x"
    assert shown(Principal("token", "certificate:x")) == "token:certificate:x"
    assert shown(Principal("token", "token:x")) == "token:token:x"
    assert shown(Principal("token", "anonymous")) == "token:anonymous"
    assert shown(Principal("token", "")) == "token:"
    assert shown(Principal("token", "899700367909")) == "899700367909"
    assert shown("") == "anonymous"  # no credential shown
    assert shown("MODALITY") == "MODALITY"  # a calling AE title
