"""Access through a manifest: a consumer that sends ``KOS-SOPInstanceUID: <uid>`` (the
national consumer does, see tests/data/drimm/wado-rs-series-request.txt) is answered
only for the study, series and instances that this published, non-withdrawn KOS references.
With ``require_kos_reference`` every read must carry one.

The decision is made on the request's ``RequestTarget``, for every method (HEAD is a GET).
A request it admits names a study, series or instance of the manifest; what it is then
served at every level (retrieve, metadata, QIDO-RS, counts included) is further restricted
by the handlers to the instances the manifest references (``scoped_instances``): an
instance stored after the publication is not part of it.
"""

import logging
import threading
from dataclasses import dataclass
from functools import cached_property
from io import BytesIO

from pydicom import dcmread
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.metrics import MANIFEST_ACCESS
from gateway.web.http.errors import error_response
from gateway.web.http.request_target import Operation, RequestTarget, target_of
from storage.outbox import Outbox
from storage.store import Store
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)

_CACHED_MANIFESTS = 1024
_SCOPED_KEY = "passerelle.manifest_instances"
class ManifestDeniedError(Exception):
    """The manifest does not open this request (reason in the message)."""


@dataclass(frozen=True)
class ManifestReferences:
    """What one manifest references: its study, and per series the SOP Instance UIDs."""

    study_uid: str
    series: dict[str, frozenset[str]]

    def covers(self, study: str, series: str | None, instance: str | None) -> bool:
        """True when the study (and series, and instance) asked for is referenced."""
        if study != self.study_uid:
            return False
        if series is None:
            return True
        return series in self.series and (instance is None or instance in self.series[series])

    @cached_property
    def sop_uids(self) -> frozenset[str]:
        """Every SOP Instance UID the manifest references."""
        return frozenset().union(*self.series.values())


def scoped_instances(connection: HTTPConnection | Scope) -> frozenset[str] | None:
    """The SOP Instance UIDs a request admitted through a manifest may see (those the
    manifest references); None when no manifest scopes the request."""
    scope = connection.scope if isinstance(connection, HTTPConnection) else connection
    return scope.get("state", {}).get(_SCOPED_KEY)


class ManifestAccess:
    """Looks up manifests in the outbox and their references in the stored KOS files."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.outbox = Outbox(store.index)
        self._parsed: dict[str, ManifestReferences] = {}  # KOS files never change
        self._lock = threading.Lock()

    def references(self, kos_uid: str) -> ManifestReferences:
        """The references of a published, non-withdrawn manifest; ManifestDeniedError else."""
        publication = self.outbox.manifest_publication(kos_uid) if is_valid_uid(kos_uid) \
            else None
        if publication is None:
            raise ManifestDeniedError(f"manifest {kos_uid[:64]!r} was not published here")
        # Withdrawn itself, or its study withdrawn since (a replaced manifest stays valid:
        # what it references is still there).
        if self.outbox.was_withdrawn(kos_uid) or \
                self.outbox.published_document(publication.study_uid) is None:
            raise ManifestDeniedError(f"manifest {kos_uid} was withdrawn")
        with self._lock:
            cached = self._parsed.get(kos_uid)
        if cached is not None:
            return cached
        data = self.store.blobs.read(self.store.blobs.manifest_path(publication.study_uid,
                                                                    kos_uid))
        kos = dcmread(BytesIO(data))
        series = {item.SeriesInstanceUID: frozenset(ref.ReferencedSOPInstanceUID
                                                    for ref in item.ReferencedSOPSequence)
                  for study in kos.CurrentRequestedProcedureEvidenceSequence
                  for item in study.ReferencedSeriesSequence}
        parsed = ManifestReferences(publication.study_uid, series)
        with self._lock:
            if len(self._parsed) >= _CACHED_MANIFESTS:
                self._parsed.clear()
            self._parsed[kos_uid] = parsed
        return parsed


class ManifestScopeMiddleware:
    """403 for DICOMweb / WADO-URI requests outside the manifest the request names."""

    def __init__(self, app: ASGIApp, access: ManifestAccess, required: bool) -> None:
        self.app = app
        self.access = access
        self.required = required

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = target_of(scope) if scope["type"] == "http" else None
        if target is None or not (target.operation.reads_studies or target.operation in
                                  (Operation.STORE, Operation.ADMIN)):
            await self.app(scope, receive, send)
            return
        kos_uid = target.manifest
        try:
            if target.operation is Operation.ADMIN:
                # The admin API lists every patient: with reads confined to manifests, only
                # an authenticated administrator (or the control socket) may list them.
                if self.required and not scope.get("user"):
                    raise ManifestDeniedError("with require_kos_reference, the admin API "
                                              "needs an authenticated administrator")
            elif kos_uid:
                references = await self._check(target, kos_uid)
                scope["state"][_SCOPED_KEY] = references.sop_uids
            elif self.required and target.operation.reads_studies:
                raise ManifestDeniedError("a KOS-SOPInstanceUID header is required")
        except ManifestDeniedError as exc:
            MANIFEST_ACCESS.labels("denied").inc()
            client = scope.get("client") or ("?", 0)
            log.warning("refused %s %s from %s (%s): %s", target.method, scope["path"],
                        client[0], scope.get("user", "anonymous"), exc)
            await error_response(scope["path"], 403, str(exc))(scope, receive, send)
            return
        if kos_uid and target.operation is not Operation.ADMIN:
            MANIFEST_ACCESS.labels("allowed").inc()
        await self.app(scope, receive, send)

    async def _check(self, target: RequestTarget, kos_uid: str) -> ManifestReferences:
        """The manifest's references, once it is known to open ``target``."""
        if target.operation is Operation.STORE:
            raise ManifestDeniedError("a manifest opens what it references for reading only")
        if target.study is None:
            raise ManifestDeniedError("a request scoped by a manifest must name its study")
        references = await run_in_threadpool(self.access.references, kos_uid)
        if not references.covers(target.study, target.series, target.instance):
            named = (target.study, target.series, target.instance)
            raise ManifestDeniedError(f"manifest {kos_uid} does not reference "
                                      f"{'/'.join(uid for uid in named if uid)}")
        return references
