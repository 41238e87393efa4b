"""The outbox worker: sends each outbox row to the document registry and records the answer.

Guarantees: a row reaches ``acknowledged`` once the registry holds what it asked for, and a
manifest is never registered twice. A row is marked ``sent`` before the request leaves; a row
found ``sent`` (after a timeout, a 5xx or a crash) is first looked up in the registry by its
uniqueId (ITI-67) and only sent again when the registry does not have it.

Replicas: each publisher works only on the rows it leased (``Outbox.claim``), renews the
lease while an attempt runs and gives the row up when it finds its lease taken over.
"""

import json
import logging
import os
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.config import ProducerSettings, PublicationSettings
from gateway.metrics import PUBLICATION_ATTEMPTS, UNMAPPED_EVENT_CODES
from gateway.publication.confidentiality import Confidentiality
from gateway.publication.event_codes import EventCodeTable
from gateway.publication.kos import Issuers, Manifest, RetrieveOrigin, build_manifest
from gateway.publication.mhd import (
    MetadataError,
    Producer,
    document_id,
    orders_without_authority,
    provide_document_bundle,
    security_label_patch,
    status_patch,
)
from gateway.publication.periodic import PeriodicWorker
from gateway.publication.registry_client import RegistryClient, RejectedError, TransientError
from gateway.security.audit import AuditEvent, AuditTrail, EventType
from gateway.security.audit import Outcome as AuditOutcome
from storage.outbox import Action, LeaseLostError, Outbox, Publication, State
from storage.store import Store
from storage.study_contents import StudyContents, load_study_contents

log = logging.getLogger(__name__)


class _RefusedError(Exception):
    """A row that cannot succeed as it stands (said in the message)."""

    def __init__(self, message: str, body: str = "") -> None:
        super().__init__(message)
        self.body = body


def producer_from_settings(settings: ProducerSettings) -> Producer:
    """The institution-level metadata of the settings."""
    return Producer(**settings.model_dump(include=set(Producer.__dataclass_fields__)))


def issuers_from_settings(settings: ProducerSettings) -> Issuers:
    """The assigning authorities the settings give to manifests."""
    return Issuers(settings.patient_id_issuer_oid, settings.accession_issuer_oid,
                   settings.order_issuer_oid)


@dataclass(frozen=True)
class Leases:
    """Whose leases a publisher holds and which it may end at start.

    ``service`` names the service (``storage.recovery.ServiceLock``); the publisher leases
    as ``<service>:<pid>``. ``gone`` names the dead replicas whose locks the service took
    over, or is None for a service alone on its index, where every other holder is gone.
    An earlier background process of the same service is gone too: the supervisor starts
    the next one only once the last has exited."""

    service: str
    gone: tuple[str, ...] | None

    def holder(self) -> str:
        """The name this process leases rows as."""
        return f"{self.service}:{os.getpid()}"

    def is_gone(self, holder: str) -> bool:
        """True when no process of ``holder`` can be running any more."""
        service = holder.rpartition(":")[0]
        return self.gone is None or service == self.service or service in self.gone


class _KeptLease:
    """Renews the lease of a claimed row every third of ``seconds`` until the block ends."""

    def __init__(self, outbox: Outbox, row: Publication, seconds: float) -> None:
        self.outbox = outbox
        self.row = row
        self.seconds = seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{row.id}", daemon=True)

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.seconds / 3):
            try:
                if not self.outbox.renew(self.row, self.seconds):
                    return  # the row finished between two renewals
            except LeaseLostError as exc:
                log.warning("%s", exc)
                return
            except Exception:  # the index unreachable for a moment: try again
                log.exception("publication %d: lease renewal failed", self.row.id)


class Publisher(PeriodicWorker):
    """A thread working through the outbox of ``store`` until stopped."""

    def __init__(self, store: Store, client: RegistryClient, event_codes: EventCodeTable,
                 audit: AuditTrail, producer: ProducerSettings, origin: RetrieveOrigin,
                 publication: PublicationSettings, leases: Leases,
                 interval: float = 1.0) -> None:
        super().__init__("publisher", interval)
        self.store = store
        self.audit = audit
        self.outbox = Outbox(store.index)
        self.client = client
        self.producer = producer_from_settings(producer)
        self.issuers = issuers_from_settings(producer)
        self.origin = origin
        self.event_codes = event_codes
        self.default_confidentiality = producer.default_confidentiality()
        self.retry_seconds = publication.publish_retry_seconds
        self.retry_max_seconds = publication.publish_retry_max_seconds
        self.lease_seconds = publication.lease_seconds
        self.leases = leases
        self.replica = leases.holder()

    def start(self) -> None:
        """Release the leases of the processes known to be gone (a restart after a crash
        need not wait for them to expire), then start the thread."""
        for holder in self.outbox.lease_holders():
            if holder != self.replica and self.leases.is_gone(holder):
                released = self.outbox.release_leases(holder)
                log.warning("released the lease(s) of %d publication(s) held by %s, a "
                            "process that is gone", released, holder)
        super().start()

    def stop(self) -> None:
        """Stop after the row in progress."""
        super().stop()
        self.client.close()

    def work(self) -> None:
        """Work on due rows, one leased at a time, until none is left to lease."""
        while not self.stopping:
            row = self.outbox.claim(self.replica, self.lease_seconds)
            if row is None:
                break
            with _KeptLease(self.outbox, row, self.lease_seconds):
                try:
                    self._process(row)
                except LeaseLostError as exc:
                    log.warning("%s: left to the replica that holds it now", exc)

    def _process(self, row: Publication) -> None:
        row = self.outbox.begin_attempt(row)
        handler = {Action.PUBLISH: self._publish, Action.UNPUBLISH: self._unpublish,
                   Action.CONFIDENTIALITY: self._update_confidentiality}[row.action]
        try:
            handler(row)
        except TransientError as exc:
            self._retry(row, str(exc), exc.maybe_delivered)
        except RejectedError as exc:
            self._fail(row, str(exc), exc.body)
        except _RefusedError as exc:
            self._fail(row, str(exc), exc.body)
        except LeaseLostError:
            raise
        except Exception as exc:  # a bug must leave the row retryable, not kill the worker
            log.exception("publication %d: unexpected error", row.id)
            self._retry(row, f"internal error: {exc!r}", maybe_delivered=True)

    def _publish(self, row: Publication) -> None:
        if row.state is State.SENT and row.kos_uid:
            found = self.client.find(row.kos_uid)
            if found:
                self._acknowledge(row, found, "registered by an earlier attempt whose answer "
                                              "was lost", kos_uid=row.kos_uid)
                return
        study = load_study_contents(self.store.index, row.study_uid)
        if study is None or not study.series:
            raise _RefusedError(f"study {row.study_uid} is no longer stored")
        previous = self.outbox.published_document(row.study_uid)
        manifest = self._manifest(study)
        if previous is not None and previous.kos_uid == manifest.sop_uid:
            self._acknowledge(row, previous.document_id, "unchanged since its publication",
                              kos_uid=manifest.sop_uid)
            return
        events, unmapped = self.event_codes.codes([s.modality for s in study.series],
                                                  [s.body_part for s in study.series])
        for value in unmapped:
            UNMAPPED_EVENT_CODES.labels(value.split()[0]).inc()
            log.warning("study %s: %s has no event code in the mapping table; not sent",
                        row.study_uid, value)
        try:
            bundle = provide_document_bundle(
                manifest, self.producer, events, self._confidentiality(row.study_uid),
                replaces=previous.document_id if previous else "")
        except MetadataError as exc:
            raise _RefusedError(str(exc)) from exc
        orders = orders_without_authority(manifest)
        if orders:
            log.warning("publication %d (study %s): placer order number %s has no assigning "
                        "authority OID (none in the instances): left out of the registry "
                        "metadata (referenceIdList); set order_issuer_oid to include it",
                        row.id, row.study_uid, ", ".join(repr(o) for o in orders))
        self._keep(manifest, row.study_uid)
        self.outbox.mark_sent(row, manifest.sop_uid, previous.kos_uid if previous else "")
        try:
            response = self.client.provide(bundle)
        except RejectedError as exc:
            # Our own earlier attempt may be what the registry holds (answer lost).
            found = self.client.find(manifest.sop_uid) \
                if "XDSDuplicateUniqueIdInRegistry" in exc.codes else ""
            if not found:
                raise
            self._acknowledge(row, found, "already registered", kos_uid=manifest.sop_uid)
            return
        self._acknowledge(row, document_id(response) or self.client.find(manifest.sop_uid),
                          json.dumps(response), kos_uid=manifest.sop_uid)

    def _manifest(self, study: StudyContents) -> Manifest:
        """The study's manifest: the bytes kept under ``manifests/`` when this uniqueId was
        sent before (a rebuild may differ in its content time, or after an upgrade), else
        the one built now, kept only once sent (``_keep``): a manifest refused before
        sending leaves nothing behind, so the fix of the refusal is what is sent next."""
        manifest = build_manifest(study, self.origin, self.issuers,
                                  self.outbox.withdrawals(study.study_uid))
        path = self.store.blobs.absolute(self.store.blobs.manifest_path(study.study_uid,
                                                                         manifest.sop_uid))
        if path.exists():
            return Manifest(manifest.sop_uid, manifest.series_uid, path.read_bytes())
        return manifest

    def _keep(self, manifest: Manifest, study_uid: str) -> None:
        """Keep the bytes about to be sent, once: those sent again under this uniqueId."""
        relative = self.store.blobs.manifest_path(study_uid, manifest.sop_uid)
        if not self.store.blobs.absolute(relative).exists():
            self.store.blobs.put(relative, [manifest.data])

    def _confidentiality(self, study_uid: str) -> Confidentiality:
        payload = self.outbox.confidentiality(study_uid)
        return Confidentiality.from_payload(payload) if payload else self.default_confidentiality

    def _unpublish(self, row: Publication) -> None:
        previous = self.outbox.published_document(row.study_uid)
        if previous is None:
            raise _RefusedError(f"study {row.study_uid} has no published manifest to withdraw")
        self.outbox.mark_sent(row, previous.kos_uid)
        # Withdrawal = status superseded: the only other status MHD allows (IHE ITI MHD
        # 4.2.3, DocumentReference.status; entered-in-error is refused, IHE/ITI.MHD#274).
        response = self.client.patch(previous.document_id, status_patch("superseded"))
        self._acknowledge(row, previous.document_id, json.dumps(response),
                          kos_uid=previous.kos_uid)

    def _update_confidentiality(self, row: Publication) -> None:
        previous = self.outbox.published_document(row.study_uid)
        if previous is None:
            self._acknowledge(row, "", "nothing published yet: applies to the next publication")
            return
        self.outbox.mark_sent(row, previous.kos_uid)
        response = self.client.patch(previous.document_id,
                                     security_label_patch(self._confidentiality(row.study_uid)))
        self._acknowledge(row, previous.document_id, json.dumps(response),
                          kos_uid=previous.kos_uid)

    def _acknowledge(self, row: Publication, document: str, response: str,
                     kos_uid: str | None = None) -> None:
        self.outbox.acknowledge(row, document, response, kos_uid)
        PUBLICATION_ATTEMPTS.labels(row.action.value, "acknowledged").inc()
        self._audit(row, AuditOutcome.SUCCESS, f"{row.action} acknowledged: {document}")
        log.info("publication %d (%s of study %s) acknowledged: %s", row.id, row.action,
                 row.study_uid, document or response)

    def _fail(self, row: Publication, reason: str, body: str) -> None:
        self.outbox.fail(row, reason, body)
        PUBLICATION_ATTEMPTS.labels(row.action.value, "rejected").inc()
        self._audit(row, AuditOutcome.MINOR_FAILURE, f"{row.action} refused: {reason}")
        log.error("publication %d (%s of study %s) failed: %s; fix, then "
                  "`passerelle outbox retry %d`", row.id, row.action, row.study_uid, reason,
                  row.id)

    def _audit(self, row: Publication, outcome: AuditOutcome, detail: str) -> None:
        """An Export event: study metadata left for the registry (or was refused there)."""
        self.audit.record(AuditEvent(EventType.EXPORT, "R", outcome, self.client.base_url,
                                     urlsplit(self.client.base_url).hostname or "",
                                     row.study_uid, detail))

    def _retry(self, row: Publication, reason: str, maybe_delivered: bool) -> None:
        delay = min(self.retry_seconds * 2 ** (row.attempts - 1), self.retry_max_seconds)
        self.outbox.reschedule(row, reason, delay, maybe_delivered)
        PUBLICATION_ATTEMPTS.labels(row.action.value, "retry").inc()
        log.warning("publication %d (%s of study %s): %s; attempt %d, next in %.0f s", row.id,
                    row.action, row.study_uid, reason, row.attempts, delay)
