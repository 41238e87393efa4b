"""Audit trail: one DICOM audit message (PS3.15 A.5, the ATNA vocabulary) per access,
ingest, publication and authentication failure, as JSON lines under ``data/audit/``.

Events are queued by the request paths and written by one thread, which appends each batch,
fsyncs it, rotates the file past ``max_bytes`` and optionally copies each message to a
syslog collector (``gateway.security.syslog_export``: UDP or TLS). The patient of an event is looked
up there too (a failed lookup writes the event without it), so auditing costs a request nothing
but a queue put. The written accesses to studies then go, through a bounded queue, to a thread of
their own that counts them in the index (``storage.study_accesses``: who saw a study), so a slow
or locked database never holds back the file's writes.

Repeated authentication failures are aggregated so that a flood of refused requests cannot
rotate the trail away: per period, the first failure of each client address and reason is
written in full, the others are counted and written at the period's end (or early, at
100, 1 000... failures) as one Security Alert per client (PS3.15 A.5.3.11) with their
count, first and last time and reasons. At
most ``failure_clients`` addresses are tracked per period; the failures of any further one
are counted together, under ``OTHER_CLIENTS``. Rotated files older than ``max_age_days``
are removed, as are those past ``backups``.
"""

import base64
import contextlib
import enum
import fcntl
import json
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TextIO

from gateway.config import AuditSettings
from gateway.metrics import (
    AUDIT_FAILURES_AGGREGATED,
    AUDIT_FILES_REMOVED,
    AUDIT_SECURITY_ALERTS,
    STUDY_ACCESSES_UNINDEXED,
)
from gateway.security.syslog_export import TlsSyslog, UdpSyslog, syslog_message
from storage.study_accesses import Access

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
ANONYMOUS = "anonymous"  # the UserID of a request that showed no credential
OTHER_CLIENTS = "other clients"  # the failures of addresses past the aggregation table's bound
_MAX_REASONS = 8  # per client and period; further ones are counted as "other"
_MAX_USERS = 8  # user names kept per client and period (a calling AE title is the peer's choice)
_EARLY_ALERTS = frozenset(10 ** k for k in range(2, 13))  # counts that write an alert at once
_SWEEP_SECONDS = 3600  # how often rotated files are checked for age on a quiet trail
_MAX_UNCOUNTED = 10_000  # accesses waiting for the index; further ones are dropped (and counted)
_DROP_LOG_SECONDS = 60.0  # at most one log line per period about dropped accesses


class EventType(enum.Enum):
    """Audit event IDs (DCM, PS3.15 A.5.3 / PS3.16 CID 400): (code, meaning)."""

    INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
    EXPORT = ("110106", "Export")
    QUERY = ("110112", "Query")
    SECURITY_ALERT = ("110113", "Security Alert")
    USER_AUTHENTICATION = ("110114", "User Authentication")


class Outcome(enum.StrEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"  # refused: denied, not found, bad request
    SERIOUS_FAILURE = "8"  # our failure


class Principal(Protocol):
    """Who an HTTP request speaks for, as access control established it (the shape of
    ``gateway.web.middleware.auth.Principal``): a token subject or a client certificate."""

    @property
    def kind(self) -> str:
        """``token``, ``session`` (a browser signed in with a token) or ``certificate``."""
        ...

    @property
    def name(self) -> str:
        """The token's subject, or the certificate's configured name."""
        ...


_RESERVED_PREFIXES = ("certificate:", "token:")


def user_id(user: "str | Principal") -> str:
    """The UserID of who acted, one form per kind so that no two read the same: a client
    certificate is ``certificate:NAME``; a token subject is itself, unless it could be read
    as another kind (empty, ``anonymous``, or starting with ``certificate:`` or ``token:``),
    then ``token:SUBJECT``; a plain name (AE title, URL) is itself."""
    if isinstance(user, str):
        return user or ANONYMOUS
    if user.kind == "certificate":
        return f"certificate:{user.name}"
    if not user.name or user.name == ANONYMOUS or user.name.startswith(_RESERVED_PREFIXES):
        return f"token:{user.name}"
    return user.name


@dataclass(frozen=True)
class AuditEvent:
    """What happened, who did it (user: token subject or certificate, or calling AE title)
    from where."""

    event: EventType
    action: str  # EventActionCode: C create, R read, E execute
    outcome: Outcome
    user: "str | Principal"
    address: str
    study_uid: str = ""
    detail: str = ""  # what was asked: request path, query, reason
    query: str = ""  # a Query event's query, kept as ParticipantObjectQuery
    at: float = field(default_factory=time.time)

    @property
    def is_authentication_failure(self) -> bool:
        """A refused credential (HTTP 401, association refused or rejected)."""
        return self.event is EventType.USER_AUTHENTICATION and self.outcome is not Outcome.SUCCESS

    @property
    def reason(self) -> str:
        """What was wrong, without what was asked: the detail's last ``: `` part (``GET
        /path: no valid token`` is ``no valid token``)."""
        return self.detail.rpartition(": ")[2][:64]


# The events that show a study to whoever asked (a store, an export do not): the kind of
# access each is counted as in the index (storage.study_accesses).
_SEEING = {EventType.QUERY: "query", EventType.INSTANCES_TRANSFERRED: "retrieve",
           EventType.INSTANCES_ACCESSED: "access"}
ACCESS_KINDS = frozenset(_SEEING.values())


def study_access(event: AuditEvent) -> Access | None:
    """The access to a study ``event`` records, refused or failed ones included; None when
    it names no study or shows none (a store, a local copy removed, an export, an
    authentication)."""
    kind = _SEEING.get(event.event)
    if kind is None or not event.study_uid or event.action in ("C", "D"):
        return None
    return Access(event.study_uid, user_id(event.user), event.address, kind,
                  event.outcome is not Outcome.SUCCESS, event.at)


def _code(code: str, meaning: str) -> dict:
    return {"csd-code": code, "codeSystemName": "DCM", "originalText": meaning}


def _datetime(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def _base64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


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
            study["ParticipantObjectQuery"] = _base64(event.query)
        objects.append(study)
    elif event.query:
        objects.append({"ParticipantObjectID": "1.2.840.10008.5.1.4.1.2.2.1",
                        "ParticipantObjectTypeCode": "2",
                        "ParticipantObjectTypeCodeRole": "3",
                        "ParticipantObjectIDTypeCode": _code("110181", "SOP Class UID"),
                        "ParticipantObjectQuery": _base64(event.query)})
    if patient_id:
        objects.append({"ParticipantObjectID": patient_id, "ParticipantObjectTypeCode": "1",
                        "ParticipantObjectTypeCodeRole": "1",
                        "ParticipantObjectIDTypeCode": {"csd-code": "2",
                                                        "codeSystemName": "RFC-3881",
                                                        "originalText": "Patient Number"}})
    identification = {
        "EventID": _code(*event.event.value),
        "EventActionCode": event.action,
        "EventDateTime": _datetime(event.at),
        "EventOutcomeIndicator": event.outcome.value,
    }
    if event.event is EventType.USER_AUTHENTICATION:
        identification["EventTypeCode"] = [_code("110122", "Login")]
    if event.detail:
        identification["EventOutcomeDescription"] = event.detail[:1024]
    return {
        "EventIdentification": identification,
        "ActiveParticipant": [
            {"UserID": user_id(event.user), "UserIsRequestor": True,
             "NetworkAccessPointID": event.address, "NetworkAccessPointTypeCode": "2",
             "RoleIDCode": [_code("110152", "Destination Role ID") if requestor
                            else _code("110153", "Source Role ID")]},
            {"UserID": source_id, "UserIsRequestor": False,
             "RoleIDCode": [_code("110153", "Source Role ID") if requestor
                            else _code("110152", "Destination Role ID")]}],
        "AuditSourceIdentification": {"AuditSourceID": source_id},
        "ParticipantObjectIdentification": objects,
    }


@dataclass
class ClientFailures:
    """The authentication failures of one client in the current period, past the first of
    each reason (written in full)."""

    written: set[str] = field(default_factory=set)  # reasons whose first failure was written
    reasons: Counter[str] = field(default_factory=Counter)  # the others, counted
    users: set[str] = field(default_factory=set)
    first: float = math.inf
    last: float = -math.inf
    total: int = 0  # counted in the period, including those already taken

    @property
    def count(self) -> int:
        """Failures counted and not taken yet."""
        return sum(self.reasons.values())

    def add(self, event: AuditEvent) -> None:
        """Count one more failure."""
        reason = event.reason
        if reason not in self.reasons and len(self.reasons) >= _MAX_REASONS:
            reason = "other"
        self.reasons[reason] += 1
        if len(self.users) < _MAX_USERS:
            self.users.add(user_id(event.user))
        self.first, self.last = min(self.first, event.at), max(self.last, event.at)
        self.total += 1

    def take(self) -> "ClientFailures":
        """The failures counted so far, as a record of their own; counting starts again."""
        taken = ClientFailures(reasons=self.reasons, users=self.users, first=self.first,
                               last=self.last)
        self.reasons, self.users, self.first, self.last = Counter(), set(), math.inf, -math.inf
        return taken


class FailureAggregator:
    """Repeated authentication failures per client address and period (``period``
    seconds, on the monotonic clock, from the first failure after the last one ended). A
    client whose count in the period reaches 100, 1 000, 10 000... has its alert written
    at once, then counting goes on: a flood shows before the period ends."""

    def __init__(self, period: float, clients: int) -> None:
        self.period = period
        self.clients = clients  # addresses tracked per period, OTHER_CLIENTS aside
        self._table: dict[str, ClientFailures] = {}
        self._ready: list[tuple[str, ClientFailures]] = []  # alerts due before the period ends
        self.ends = math.inf  # monotonic time at which the current period ends

    def admit(self, event: AuditEvent) -> bool:
        """Whether ``event`` is written in full; False: it was counted instead."""
        if not event.is_authentication_failure:
            return True
        if not self._table:
            self.ends = time.monotonic() + self.period
        address = event.address
        failures = self._table.get(address)
        if failures is None:
            if len(self._table) - (OTHER_CLIENTS in self._table) >= self.clients:
                address = OTHER_CLIENTS
                failures = self._table.setdefault(OTHER_CLIENTS, ClientFailures())
            else:
                failures = self._table[address] = ClientFailures()
        if address != OTHER_CLIENTS and event.reason not in failures.written \
                and len(failures.written) < _MAX_REASONS:
            failures.written.add(event.reason)
            return True
        failures.add(event)
        AUDIT_FAILURES_AGGREGATED.labels(
            "other_clients" if address == OTHER_CLIENTS else "client").inc()
        if failures.total in _EARLY_ALERTS:
            self._ready.append((address, failures.take()))
        return False

    def due(self) -> bool:
        """Whether the current period has ended."""
        return time.monotonic() >= self.ends

    def drain(self, ended: bool) -> list[tuple[str, ClientFailures]]:
        """The counted failures to write, by client address: those of the clients whose
        count crossed a threshold and, when ``ended`` (the period is over, or the trail
        closes), every client's; the next period then starts empty."""
        counted, self._ready = self._ready, []
        if ended:
            counted += [(address, failures) for address, failures in self._table.items()
                        if failures.count]
            self._table.clear()
            self.ends = math.inf
        return counted


def _detail(kind: str, value: str) -> dict:
    """A ParticipantObjectDetail type-value pair (the value base64, as in the schema)."""
    return {"type": kind, "value": _base64(value)}


def failures_message(address: str, failures: ClientFailures, source_id: str) -> dict:
    """The counted failures of one client as a Security Alert (PS3.15 A.5.3.11): type Use of
    Restricted Function, outcome minor failure (refused: mitigation effective), the client
    as Alert Subject whose ParticipantObjectDetail gives the count, first and last time and
    each reason's count."""
    first, last = _datetime(failures.first), _datetime(failures.last)
    reasons = ", ".join(f"{reason} x{n}" for reason, n in failures.reasons.most_common())
    description = (f"{failures.count} more authentication failure(s) from {address} "
                   f"from {first} to {last}: {reasons}")
    network = {} if address == OTHER_CLIENTS else {"NetworkAccessPointID": address,
                                                   "NetworkAccessPointTypeCode": "2"}
    return {
        "EventIdentification": {
            "EventID": _code(*EventType.SECURITY_ALERT.value),
            "EventActionCode": "E",
            "EventDateTime": last,
            "EventOutcomeIndicator": Outcome.MINOR_FAILURE.value,
            "EventTypeCode": [_code("110132", "Use of Restricted Function")],
            "EventOutcomeDescription": description[:1024]},
        "ActiveParticipant": [
            *({"UserID": user, "UserIsRequestor": True, **network}
              for user in sorted(failures.users)),
            {"UserID": source_id, "UserIsRequestor": False}],
        "AuditSourceIdentification": {"AuditSourceID": source_id},
        "ParticipantObjectIdentification": [{
            "ParticipantObjectID": address,
            "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "13",  # Security Resource
            "ParticipantObjectIDTypeCode": _code("110182", "Node ID"),
            "ParticipantObjectDetail": [
                _detail("Alert Description", description), _detail("Count", str(failures.count)),
                _detail("First", first), _detail("Last", last),
                *(_detail("Reason", f"{reason}: {n}")
                  for reason, n in failures.reasons.most_common())]}],
    }


class AuditTrail:
    """The audit log of one service: ``record`` queues, a thread writes durably."""

    def __init__(self, directory: Path, source_id: str, patient_of: Callable[[str], str],
                 settings: AuditSettings, syslog: UdpSyslog | TlsSyslog | None = None,
                 count_accesses: Callable[[list[Access]], None] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / AUDIT_FILE
        self.source_id = source_id
        self.patient_of = patient_of
        self.max_bytes = settings.max_bytes
        self.backups = settings.backups
        self.max_age_seconds = settings.max_age_days * 86400
        self.syslog = syslog
        self.count_accesses = count_accesses  # the index's per-study counts, each batch
        self._failures = FailureAggregator(settings.failure_period_seconds,
                                           settings.failure_clients)
        self._next_sweep = 0.0  # monotonic time of the next check of the files' ages
        self._queue: queue.Queue[AuditEvent | None] = queue.Queue()
        self._accesses: queue.Queue[Access | None] = queue.Queue(_MAX_UNCOUNTED)
        self._dropped = 0  # accesses dropped since the last log line about them
        self._drop_logged = -math.inf  # monotonic time of that line
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._counter = threading.Thread(target=self._count, name="audit-accesses",
                                         daemon=True)
        self._thread.start()
        if count_accesses is not None:
            self._counter.start()

    def record(self, event: AuditEvent) -> None:
        """Queue one event (never blocks the caller)."""
        self._queue.put(event)

    def close(self) -> None:
        """Write what is queued and counted, count the accesses written, then stop."""
        self._queue.put(None)
        self._thread.join()
        if self._counter.is_alive():
            self._accesses.put(None)
            self._counter.join()
        if self.syslog is not None:
            self.syslog.close()

    def _timeout(self) -> float:
        """How long the thread may wait for an event before it has something to do."""
        now = time.monotonic()
        wake = min(self._failures.ends, self._next_sweep)
        if self.syslog is not None and self.syslog.waiting:
            wake = min(wake, now + 1)  # the collector has messages to catch up on
        return max(0.0, wake - now)

    def _run(self) -> None:
        running = True
        while running:
            try:
                batch = [self._queue.get(timeout=self._timeout())]
            except queue.Empty:
                batch = []
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            running = None not in batch
            events = [e for e in batch if e is not None and self._failures.admit(e)]
            counted = self._failures.drain(self._failures.due() or not running)
            try:  # a full disk must not kill the audit thread
                if events or counted:
                    self._write(events, counted)
                elif self.syslog is not None:
                    self.syslog.send([])
                if time.monotonic() >= self._next_sweep:
                    self._remove_expired()
            except Exception:
                log.exception("could not write %d audit event(s) and %d client(s)' failures",
                              len(events), len(counted))
            self._queue_accesses(events)

    def _queue_accesses(self, events: list[AuditEvent]) -> None:
        """Hand the batch's accesses to studies to the counting thread, after (and whatever
        became of) the file's write, never waiting: when its queue is full, they are dropped,
        counted in the metric and logged (at most once per ``_DROP_LOG_SECONDS``)."""
        if self.count_accesses is None:
            return
        for event in events:
            if access := study_access(event):
                try:
                    self._accesses.put_nowait(access)
                except queue.Full:
                    STUDY_ACCESSES_UNINDEXED.inc()
                    self._dropped += 1
        if self._dropped and time.monotonic() >= self._drop_logged + _DROP_LOG_SECONDS:
            log.warning("dropped %d study access(es) not counted in the index: %d already wait"
                        " for it (the audit trail has them)", self._dropped, _MAX_UNCOUNTED)
            self._dropped, self._drop_logged = 0, time.monotonic()

    def _count(self) -> None:
        """The counting thread: what waits is counted in the index in one transaction, until
        ``close``; a failure is logged and counted, the trail keeps the accesses."""
        assert self.count_accesses is not None  # started only with the hook
        running = True
        while running:
            batch = [self._accesses.get()]
            while len(batch) < _MAX_UNCOUNTED and not self._accesses.empty():
                batch.append(self._accesses.get_nowait())
            running = None not in batch
            accesses = [access for access in batch if access is not None]
            if not accesses:
                continue
            try:
                self.count_accesses(accesses)
            except Exception:
                STUDY_ACCESSES_UNINDEXED.inc(len(accesses))
                log.exception("could not count %d study access(es) in the index (the audit "
                              "trail has them)", len(accesses))

    def _write(self, events: list[AuditEvent], counted: list[tuple[str, ClientFailures]]
               ) -> None:
        patients: dict[str, str] = {}
        messages = []
        for event in events:
            if event.study_uid and event.study_uid not in patients:
                patients[event.study_uid] = self._patient(event.study_uid)
            messages.append(audit_message(event, self.source_id,
                                          patients.get(event.study_uid, "")))
        messages += [failures_message(address, failures, self.source_id)
                     for address, failures in counted]
        AUDIT_SECURITY_ALERTS.inc(len(counted))
        lines = [json.dumps(message, ensure_ascii=False, separators=(",", ":"))
                 for message in messages]
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

    def _patient(self, study_uid: str) -> str:
        """The Patient ID of a study, "" (logged) when the lookup fails: the event is written
        without it rather than not at all."""
        try:
            return self.patient_of(study_uid)
        except Exception:
            log.exception("could not look up the patient of study %s: its audit event(s) "
                          "name none", study_uid[:64])
            return ""

    def _rotate(self) -> None:
        with _rotation_lock(self.path.parent, fcntl.LOCK_EX):
            self._shift_files()

    def _shift_files(self) -> None:
        oldest = self.path.with_name(f"{AUDIT_FILE}.{self.backups}")
        if oldest.exists():
            young = oldest.stat().st_mtime > time.time() - self.max_age_seconds
            oldest.unlink()
            AUDIT_FILES_REMOVED.labels("size").inc()
            if young:
                log.warning("audit file removed at audit_backups=%d although younger than "
                            "audit_max_age_days=%d: the trail keeps less than intended (raise "
                            "audit_backups or audit_max_bytes)", self.backups,
                            self.max_age_seconds // 86400)
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{AUDIT_FILE}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{AUDIT_FILE}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{AUDIT_FILE}.1"))

    def _remove_expired(self) -> None:
        """Remove the rotated files last written more than ``max_age_days`` ago."""
        self._next_sweep = time.monotonic() + _SWEEP_SECONDS
        cutoff = time.time() - self.max_age_seconds
        with _rotation_lock(self.path.parent, fcntl.LOCK_EX):
            for path in self.path.parent.glob(f"{AUDIT_FILE}.*"):
                if path.suffix[1:].isdigit() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    AUDIT_FILES_REMOVED.labels("age").inc()
                    log.info("removed %s: older than audit_max_age_days", path.name)


def read_events(directory: Path) -> Iterator[dict]:
    """Every audit message under ``directory``, oldest first (rotated files included).

    The files are all opened before any is read, between two rotations, so a reader beside the
    running service sees each message once.
    """
    files = _open_trail(directory)
    try:
        for lines in files:
            for line in lines:
                if line.strip():
                    yield json.loads(line)
    finally:
        for lines in files:
            lines.close()


def _open_trail(directory: Path) -> list[TextIO]:
    """The trail's files, opened oldest first, between two rotations (see ``_rotation_lock``)."""
    with _rotation_lock(directory, fcntl.LOCK_SH):
        rotated = sorted((p for p in directory.glob(f"{AUDIT_FILE}.*") if p.suffix[1:].isdigit()),
                         key=lambda p: int(p.suffix[1:]), reverse=True)
        live = directory / AUDIT_FILE
        return [path.open(encoding="utf-8") for path in [*rotated, live] if path.exists()]


@contextlib.contextmanager
def _rotation_lock(directory: Path, operation: int) -> Iterator[None]:
    """A lock on the audit directory: exclusive while the writer renames or removes files, shared
    while a reader opens them, so a reader never sees a file twice or misses one mid-rotation."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # closing releases the lock
