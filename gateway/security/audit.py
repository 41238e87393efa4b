"""Audit trail: one DICOM audit message (PS3.15 A.5, the ATNA vocabulary) per access,
ingest, publication and authentication failure, as JSON lines under ``data/audit/``.

Events are queued by the request paths and written by one thread, which appends each batch,
fsyncs it, rotates the file past ``max_bytes`` and optionally copies each message to a
syslog collector (``gateway.security.syslog_export``: UDP or TLS). The patient of an event is looked
up there too, so auditing costs a request nothing but a queue put.
"""

import base64
import enum
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gateway.security.syslog_export import TlsSyslog, UdpSyslog, syslog_message

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"


class EventType(enum.Enum):
    """Audit event IDs (DCM, PS3.15 A.5.3 / PS3.16 CID 400): (code, meaning)."""

    INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
    EXPORT = ("110106", "Export")
    QUERY = ("110112", "Query")
    USER_AUTHENTICATION = ("110114", "User Authentication")


class Outcome(enum.StrEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"  # refused: denied, not found, bad request
    SERIOUS_FAILURE = "8"  # our failure


@dataclass(frozen=True)
class AuditEvent:
    """What happened, who did it (user: token subject or calling AE title) from where."""

    event: EventType
    action: str  # EventActionCode: C create, R read, E execute
    outcome: Outcome
    user: str
    address: str
    study_uid: str = ""
    detail: str = ""  # what was asked: request path, query, reason
    query: str = ""  # a Query event's query, kept as ParticipantObjectQuery
    at: float = field(default_factory=time.time)


def _code(code: str, meaning: str) -> dict:
    return {"csd-code": code, "codeSystemName": "DCM", "originalText": meaning}


def audit_message(event: AuditEvent, source_id: str, patient_id: str) -> dict:
    """The event as a DICOM audit message (PS3.15 A.5.1 element names, JSON)."""
    requestor = event.action != "C"  # a store is requested by the peer, then we receive
    objects = []
    if event.study_uid:
        study: dict = {"ParticipantObjectID": event.study_uid,
                       "ParticipantObjectTypeCode": "2",
                       "ParticipantObjectTypeCodeRole": "3",
                       "ParticipantObjectIDTypeCode": _code("110180", "Study Instance UID")}
        if event.query:
            study["ParticipantObjectQuery"] = base64.b64encode(event.query.encode()).decode()
        objects.append(study)
    elif event.query:
        objects.append({"ParticipantObjectID": "1.2.840.10008.5.1.4.1.2.2.1",
                        "ParticipantObjectTypeCode": "2",
                        "ParticipantObjectTypeCodeRole": "3",
                        "ParticipantObjectIDTypeCode": _code("110181", "SOP Class UID"),
                        "ParticipantObjectQuery":
                            base64.b64encode(event.query.encode()).decode()})
    if patient_id:
        objects.append({"ParticipantObjectID": patient_id, "ParticipantObjectTypeCode": "1",
                        "ParticipantObjectTypeCodeRole": "1",
                        "ParticipantObjectIDTypeCode": {"csd-code": "2",
                                                        "codeSystemName": "RFC-3881",
                                                        "originalText": "Patient Number"}})
    identification = {
        "EventID": _code(*event.event.value),
        "EventActionCode": event.action,
        "EventDateTime": datetime.fromtimestamp(event.at, UTC).isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": event.outcome.value,
    }
    if event.event is EventType.USER_AUTHENTICATION:
        identification["EventTypeCode"] = [_code("110122", "Login")]
    if event.detail:
        identification["EventOutcomeDescription"] = event.detail[:1024]
    return {
        "EventIdentification": identification,
        "ActiveParticipant": [
            {"UserID": event.user or "anonymous", "UserIsRequestor": True,
             "NetworkAccessPointID": event.address, "NetworkAccessPointTypeCode": "2",
             "RoleIDCode": [_code("110152", "Destination Role ID") if requestor
                            else _code("110153", "Source Role ID")]},
            {"UserID": source_id, "UserIsRequestor": False,
             "RoleIDCode": [_code("110153", "Source Role ID") if requestor
                            else _code("110152", "Destination Role ID")]}],
        "AuditSourceIdentification": {"AuditSourceID": source_id},
        "ParticipantObjectIdentification": objects,
    }


class AuditTrail:
    """The audit log of one service: ``record`` queues, a thread writes durably."""

    def __init__(self, directory: Path, source_id: str, patient_of: Callable[[str], str],
                 max_bytes: int = 64 << 20, backups: int = 10,
                 syslog: UdpSyslog | TlsSyslog | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / AUDIT_FILE
        self.source_id = source_id
        self.patient_of = patient_of
        self.max_bytes = max_bytes
        self.backups = backups
        self.syslog = syslog
        self._queue: queue.Queue[AuditEvent | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()

    def record(self, event: AuditEvent) -> None:
        """Queue one event (never blocks the caller)."""
        self._queue.put(event)

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()
        if self.syslog is not None:
            self.syslog.close()

    def _run(self) -> None:
        running = True
        while running:
            try:  # wake up now and then while the collector has messages to catch up on
                batch = [self._queue.get(timeout=1 if self.syslog and self.syslog.waiting
                                         else None)]
            except queue.Empty:
                self.syslog.send([])  # type: ignore[union-attr]
                continue
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            running = None not in batch
            events = [event for event in batch if event is not None]
            if events:
                try:
                    self._write(events)
                except Exception:  # a full disk must not kill the audit thread
                    log.exception("could not write %d audit event(s)", len(events))

    def _write(self, events: list[AuditEvent]) -> None:
        patients: dict[str, str] = {}
        lines = []
        for event in events:
            if event.study_uid and event.study_uid not in patients:
                patients[event.study_uid] = self.patient_of(event.study_uid)
            message = audit_message(event, self.source_id, patients.get(event.study_uid, ""))
            lines.append(json.dumps(message, ensure_ascii=False, separators=(",", ":")))
        data = ("\n".join(lines) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size >= self.max_bytes:
            self._rotate()
        if self.syslog is not None:
            self.syslog.send([syslog_message(line, self.source_id) for line in lines])

    def _rotate(self) -> None:
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{AUDIT_FILE}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{AUDIT_FILE}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{AUDIT_FILE}.1"))


def read_events(directory: Path) -> Iterator[dict]:
    """Every audit message under ``directory``, oldest first (rotated files included)."""
    rotated = sorted(directory.glob(f"{AUDIT_FILE}.*"),
                     key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
                     reverse=True)
    for path in [*rotated, directory / AUDIT_FILE]:
        if path.exists():
            with path.open(encoding="utf-8") as lines:
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
