"""Retention of local copies that never loses availability: a study's files go only once a
PACS peer is confirmed to hold every one of its instances; the study stays indexed,
published and served (its instances retrieved again from that peer on demand).

Policy: a copy is due when nobody read it for ``retention_days`` (reads counted from the
audit trail, storage.study_accesses; a study never read counts from its last reception), or,
while the data dir's disk is fuller than ``retention_high_water_percent``, the least
recently read go first until it is not. A due copy, or one ``purge`` names, is kept when:
no PACS peer is configured; the study is still receiving (not quiet for ``stable_seconds``,
or not yet queued for publication); one of its publications is not acknowledged; or no
single peer holds all of it. Holding is checked by C-FIND, Study Root, SERIES then IMAGE
level (PS3.4 C.4.1; gateway.dicom.pacs_client): every SOP Instance UID of the index, in its
series, but those an IOCM rejection note removed (IHE RAD IOCM), must be among the peer's
matches. Storage Commitment (PS3.4 J) is not asked for.

A response already sending a file is not cut short: an open file outlives its unlink
(gateway.web.dicomweb.stored_files).
"""

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway import metrics
from gateway.config import PacsSettings
from gateway.dicom.pacs_client import PacsError, held_instances
from gateway.publication.periodic import PeriodicWorker
from gateway.security.audit import AuditEvent, AuditTrail, EventType, Outcome, Principal
from storage.local_copies import LocalCopies, LocalInstance, StudyChangedError, StudyCopy
from storage.store import Store

log = logging.getLogger(__name__)

_DAY = 86400.0
_MISSING_SHOWN = 3  # missing SOP Instance UIDs a refusal names
_ABOUT_THE_PACS = ("not_held", "pacs_unreachable")


@dataclass(frozen=True)
class Decision:
    """What became (or, in a dry run, would become) of one study's local copy: ``action``
    ``removed``, ``remove`` (dry run), ``keep``, or ``gone`` (a purge of a copy removed
    before), and why; ``refusal`` names the rule
    that kept a copy the policy wanted gone (a metrics label), "" otherwise."""

    study_uid: str
    action: str
    reason: str
    refusal: str = ""
    held_by: str = ""
    instances: int = 0
    bytes: int = 0
    last_access: float = 0.0

    @property
    def removes(self) -> bool:
        """True when the copy went, or would go."""
        return self.action in ("removed", "remove")


@dataclass(frozen=True)
class _Held:
    """A peer confirmed to hold every instance of a study."""

    peer: str
    instances: list[LocalInstance]


class _Disk:
    """How full the data dir's disk is, as shutil.disk_usage tells; a dry run counts the
    bytes it would free instead of measuring them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.simulated_free = 0
        self.measure()

    def measure(self) -> None:
        usage = shutil.disk_usage(self.path)
        self.total, self.used = usage.total, usage.used

    def percent(self) -> float:
        return 100.0 * max(self.used - self.simulated_free, 0) / self.total if self.total else 0


def _days(seconds: float) -> str:
    return f"{seconds / _DAY:.1f} days"


class Retention:
    """The policy over one store, asking ``pacs.peers`` as ``calling_ae``."""

    def __init__(self, pacs: PacsSettings, calling_ae: str, stable_seconds: float,
                 store: Store, audit: AuditTrail, data_dir: Path) -> None:
        self.pacs = pacs
        self.calling_ae = calling_ae
        self.stable_seconds = stable_seconds
        self.copies = LocalCopies(store.index, store.blobs)
        self.now: Callable[[], float] = store.index.database.now
        self.audit = audit
        self.data_dir = data_dir
        self._one_at_a_time = threading.Lock()  # the periodic pass, purges, commands

    def run(self, dry_run: bool = False, user: "str | Principal" = "",
            address: str = "", stopping: Callable[[], bool] = lambda: False
            ) -> list[Decision]:
        """One pass over every study with files here, the least recently read first:
        what went (would go, ``dry_run``) and what stays, each with why."""
        with self._one_at_a_time:
            copies = [copy for copy in self.copies.studies() if self.copies.has_files(copy)]
            if not self.pacs.peers:
                return [self._kept(copy, "no PACS peer configured (pacs,"
                                         " PASSERELLE_PACS): nothing is ever removed")
                        for copy in copies]
            disk, now, decisions = _Disk(self.data_dir), self.now(), []
            for copy in copies:
                if stopping():
                    break
                trigger, why = self._due(copy, now, disk)
                if not trigger:
                    decisions.append(self._kept(copy, why))
                    continue
                decision = self._guarded(copy, why, trigger, dry_run,
                                         user or self.calling_ae, address)
                if decision.removes:
                    if dry_run:
                        disk.simulated_free += decision.bytes
                    else:
                        disk.measure()
                decisions.append(decision)
            return decisions

    def purge(self, study_uid: str, user: "str | Principal" = "",
              address: str = "") -> Decision:
        """Remove one study's local copy now, under the same guarantee as the policy
        (``Decision.action`` ``keep`` with the reason when refused); LookupError when the
        study is not stored."""
        with self._one_at_a_time:
            copy = self.copies.study(study_uid)
            if copy is None:
                raise LookupError(f"no such study {study_uid}")
            if not self.copies.has_files(copy):
                return Decision(study_uid, "gone", "no local copy: removed before, held by"
                                f" {copy.copy_held_by}", held_by=copy.copy_held_by,
                                last_access=copy.last_access)
            return self._guarded(copy, "purge asked for", "purge", False,
                                 user or self.calling_ae, address)

    def _due(self, copy: StudyCopy, now: float, disk: _Disk) -> tuple[str, str]:
        """(trigger, why) when the policy wants the copy gone, ("", why) when not."""
        age, days = now - copy.last_access, self.pacs.retention_days
        if days and age >= days * _DAY:
            return "age", f"not read for {_days(age)} (retention_days {days:g})"
        percent, mark = disk.percent(), self.pacs.retention_high_water_percent
        if percent > mark:
            return "disk", (f"disk {percent:.1f}% full, above the high-water mark {mark:g}%;"
                            f" read {_days(age)} ago")
        by_age = f"read {_days(age)} ago (retention_days {days:g})" if days \
            else "retention by age off (retention_days 0)"
        return "", f"{by_age}; disk {percent:.1f}% full, below the high-water mark {mark:g}%"

    @staticmethod
    def _kept(copy: StudyCopy, reason: str, refusal: str = "") -> Decision:
        return Decision(copy.study_uid, "keep", reason, refusal, instances=copy.instances,
                        bytes=copy.size, last_access=copy.last_access)

    def _guarded(self, copy: StudyCopy, why: str, trigger: str, dry_run: bool,
                 user: "str | Principal", address: str) -> Decision:
        """Remove the copy (or say it would go) if the guarantee allows; else keep it,
        counting the refusal (not in a dry run)."""
        checked = self._check(copy)
        if isinstance(checked, _Held) and not dry_run:
            checked = self._remove(copy, checked, why, trigger, user, address)
        if isinstance(checked, Decision):
            return checked
        if isinstance(checked, _Held):
            return Decision(copy.study_uid, "remove", f"{why}; held by {checked.peer}",
                            held_by=checked.peer, instances=len(checked.instances),
                            bytes=copy.size, last_access=copy.last_access)
        refusal, reason = checked
        if not dry_run:
            metrics.RETENTION_REFUSALS.labels(refusal).inc()
            # What an operator must look at: the PACS lacks, or does not answer for, a copy
            # the policy wants gone. The rest clears by itself (reception, publication).
            level = logging.WARNING if refusal in _ABOUT_THE_PACS else logging.INFO
            log.log(level, "local copy of study %s kept (%s): %s", copy.study_uid, why, reason)
            if trigger == "purge":
                self._audit(copy.study_uid, Outcome.MINOR_FAILURE, user, address,
                            f"local copy kept: {reason}")
        return self._kept(copy, reason, refusal)

    def _check(self, copy: StudyCopy) -> "_Held | tuple[str, str]":
        """The peer holding the whole study, or (refusal, reason) for keeping it."""
        if not self.pacs.peers:
            return "no_peer", "no PACS peer configured (pacs, PASSERELLE_PACS)"
        quiet = self.now() - copy.last_received_at
        if quiet < self.stable_seconds:
            return "receiving", (f"still receiving: last instance {quiet:.0f} s ago, stable"
                                 f" after {self.stable_seconds:g} s")
        if not copy.queued:
            return "receiving", ("changed since it was last queued for publication (a"
                                 " running service queues it once stable)")
        if copy.unfinished:
            return "publication", (f"a publication of it is {copy.unfinished} in the outbox"
                                   " (`passerelle outbox`)")
        instances = self.copies.instances(copy.study_uid)
        if not instances:
            return "no_instance", "no instance to remove"
        problems, answered = [], False
        for peer in self.pacs.peers:
            try:
                held = held_instances(peer, self.calling_ae, copy.study_uid,
                                      timeout=self.pacs.pacs_timeout)
            except PacsError as exc:
                problems.append(str(exc))
                continue
            answered = True
            pairs = {(found.sop_uid, found.series_uid) for found in held}
            missing = [i.sop_uid for i in instances if (i.sop_uid, i.series_uid) not in pairs]
            if not missing:
                return _Held(peer.ae_title, instances)
            more = len(missing) - _MISSING_SHOWN
            problems.append(f"{peer.ae_title} holds {len(instances) - len(missing)} of"
                            f" {len(instances)} instances; missing"
                            f" {', '.join(missing[:_MISSING_SHOWN])}"
                            + (f" and {more} more" if more > 0 else ""))
        return ("not_held" if answered else "pacs_unreachable"), "; ".join(problems)

    def _remove(self, copy: StudyCopy, held: _Held, why: str, trigger: str,
                user: "str | Principal", address: str) -> "Decision | tuple[str, str]":
        try:
            removal = self.copies.remove(copy, held.peer, held.instances)
        except StudyChangedError as exc:
            return "changed", f"{exc}: checked again next time"
        metrics.LOCAL_COPIES_REMOVED.labels(trigger).inc()
        metrics.LOCAL_INSTANCES_REMOVED.inc(removal.instances)
        metrics.LOCAL_COPY_BYTES_FREED.inc(removal.size)
        log.info("local copy of study %s removed: %d instances, %d bytes, held by %s (%s)",
                 copy.study_uid, removal.instances, removal.size, held.peer, why)
        self._audit(copy.study_uid, Outcome.SUCCESS, user, address,
                    f"local copy removed, held by {held.peer}: {removal.instances} instances,"
                    f" {removal.size} bytes ({why})")
        return Decision(copy.study_uid, "removed", f"{why}; held by {held.peer}",
                        held_by=held.peer, instances=removal.instances, bytes=removal.size,
                        last_access=copy.last_access)

    def _audit(self, study_uid: str, outcome: Outcome, user: "str | Principal",
               address: str, detail: str) -> None:
        """DICOM Instances Accessed, action D (PS3.15 A.5.3.2): the study's files deleted."""
        self.audit.record(AuditEvent(EventType.INSTANCES_ACCESSED, "D", outcome, user,
                                     address, study_uid, detail))


class RetentionWorker(PeriodicWorker):
    """The policy's pass every ``retention_interval_seconds`` in the background worker."""

    def __init__(self, retention: Retention) -> None:
        super().__init__("retention", retention.pacs.retention_interval_seconds)
        self.retention = retention

    def work(self) -> None:
        """One pass; what went is logged by the pass."""
        self.retention.run(stopping=lambda: self.stopping)
