"""Access through a manifest: a consumer that sends ``KOS-SOPInstanceUID: <uid>`` (the
national consumer does, see tests/data/drimm/wado-rs-series-request.txt) is answered
only for the study, series and instances that this published, non-withdrawn KOS references.
With ``require_kos_reference`` every retrieval must carry one.
"""

import logging
import re
import threading
from dataclasses import dataclass
from io import BytesIO
from urllib.parse import parse_qs

from pydicom import dcmread
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.metrics import MANIFEST_ACCESS
from gateway.web.http.errors import error_response
from storage.outbox import Outbox
from storage.store import Store
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)

_HEADER = b"kos-sopinstanceuid"
_TARGET = re.compile(r"/dicom-web/studies/(?P<study>[^/]+)(?:/series/(?P<series>[^/]+)"
                     r"(?:/instances/(?P<instance>[^/]+))?)?(?:/.*)?")
_CACHED_MANIFESTS = 1024


def kos_reference(scope: Scope) -> str:
    """The UID a request's ``KOS-SOPInstanceUID`` header names, or ``""``."""
    return dict(scope["headers"]).get(_HEADER, b"").decode("latin-1").strip()


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


def _target(scope: Scope) -> tuple[str, str | None, str | None] | None:
    """(study, series, instance) a retrieval names, or None when it names no study."""
    if scope["path"] == "/wado":
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        uids = [query.get(name, [""])[0] for name in ("studyUID", "seriesUID", "objectUID")]
        return (uids[0], uids[1] or None, uids[2] or None) if uids[0] else None
    match = _TARGET.fullmatch(scope["path"])
    return (match["study"], match["series"], match["instance"]) if match else None


class ManifestScopeMiddleware:
    """403 for DICOMweb / WADO-URI reads outside the manifest the request names."""

    def __init__(self, app: ASGIApp, access: ManifestAccess, required: bool) -> None:
        self.app = app
        self.access = access
        self.required = required

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if scope.get("method") != "GET" or not (path.startswith("/dicom-web")
                                                or path == "/wado"):
            await self.app(scope, receive, send)
            return
        kos_uid = kos_reference(scope)
        try:
            if kos_uid:
                await self._check(scope, kos_uid)
            elif self.required:
                raise ManifestDeniedError("a KOS-SOPInstanceUID header is required")
        except ManifestDeniedError as exc:
            MANIFEST_ACCESS.labels("denied").inc()
            client = scope.get("client") or ("?", 0)
            log.warning("refused %s from %s (%s): %s", path, client[0],
                        scope.get("user", "anonymous"), exc)
            await error_response(path, 403, str(exc))(scope, receive, send)
            return
        if kos_uid:
            MANIFEST_ACCESS.labels("allowed").inc()
        await self.app(scope, receive, send)

    async def _check(self, scope: Scope, kos_uid: str) -> None:
        target = _target(scope)
        if target is None:
            raise ManifestDeniedError("a request scoped by a manifest must name its study")
        references = await run_in_threadpool(self.access.references, kos_uid)
        if not references.covers(*target):
            raise ManifestDeniedError(f"manifest {kos_uid} does not reference "
                                      f"{'/'.join(uid for uid in target if uid)}")
