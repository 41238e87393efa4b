"""IHE RAD IOCM rejection notes as the service sees them: storage.rejections applies a note
on whichever ingest receives it (C-STORE, STOW-RS, import) and queues the manifest's
replacement or withdrawal; this audits and counts each one applied.

The audit event is DICOM Instances Accessed (PS3.15 A.5.3.2) with EventActionCode D
(delete: instances removed) or U (update: instances only hidden, 113001), by the peer that
sent the note; its detail names the note, its reason code and how many instances.

A rejected instance is out of the index: QIDO-RS and C-FIND do not list it, and WADO-RS,
WADO-URI, C-GET and C-MOVE answer as for an instance never stored (404 Not Found over HTTP).
PS3.18 has 410 Gone for "the origin server knows that the target did exist but has been
deleted" (e.g. Tables 11.5.3-1, 15.6.3-1); 404 is chosen because a patient-safety or
wrong-worklist rejection must not tell a consumer that an object existed under this UID (RFC
9110 15.5.5: 404 also for a server "not willing to disclose that one exists"), and one
answer for the four reasons keeps hidden and removed instances alike.
"""

import functools

from gateway.metrics import REJECTED_INSTANCES
from gateway.security.audit import AuditEvent, AuditTrail, EventType, Outcome
from storage.outbox import Action
from storage.rejections import AppliedRejection
from storage.store import Store

_MANIFEST = {Action.PUBLISH: "replacement of the published manifest queued",
             Action.UNPUBLISH: "withdrawal of the published manifest queued (nothing left)"}


def audit_rejections(store: Store, audit: AuditTrail) -> None:
    """Have every rejection note ``store`` applies audited on ``audit`` and counted."""
    store.on_rejection = functools.partial(record_rejection, audit)


def detail(applied: AppliedRejection) -> str:
    """What the audit event says of an applied note."""
    manifest = _MANIFEST[applied.publication] if applied.publication else \
        "manifest left to the stable-study flow"
    return (f"IOCM rejection note {applied.note_uid} ({applied.reason}, DCM,"
            f" \"{applied.meaning}\"): {applied.removed} instance(s) removed,"
            f" {applied.hidden} hidden, {applied.not_stored} referenced not stored here;"
            f" {manifest}")


def record_rejection(audit: AuditTrail, applied: AppliedRejection) -> None:
    """Audit and count one applied note (nothing when it changed nothing: sent again)."""
    if not applied.changed:
        return
    for action, count in (("removed", applied.removed), ("hidden", applied.hidden),
                          ("not_stored", applied.not_stored)):
        if count:
            REJECTED_INSTANCES.labels(applied.reason, action).inc(count)
    audit.record(AuditEvent(EventType.INSTANCES_ACCESSED, "U" if applied.hidden and
                            not applied.removed else "D", Outcome.SUCCESS, applied.source,
                            "", applied.study_uid, detail(applied)))
