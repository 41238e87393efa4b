"""STOW-RS (PS3.18 10.5): store instances POSTed as multipart/related application/dicom.

Each part is written to a temporary file as it arrives (never held in memory), then goes
through the same ingest path and rejection rules as a C-STORE data set (``Store.ingest_file``),
within the ingest bytes in flight of the resource budget (shared with C-STORE) and at most
``max_parts_per_request`` parts. Response: 200 all stored, 202 some stored and some
failed, 409 none stored, with the Store Instances Response Module (PS3.18 Table 10.5.3-3)
in DICOM JSON.
"""

import errno
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import cast

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway import metrics
from gateway.dicom.statuses import failure_status
from gateway.imaging.budget import OverBudget, Reservation, ResourceBudget, refuse
from gateway.urls import retrieve_url
from gateway.web.dicomweb.wado import check_uids
from gateway.web.http.accept import parse_media_type
from gateway.web.http.multipart import MultipartError, PartTooLargeError, iter_parts
from gateway.web.http.responses import error, json_response, over_budget
from gateway.web.services import services_of
from storage.blobs import BlobTooLargeError, TemporaryBlob
from storage.store import IncomingFile, IngestResult, Store, io_failure

log = logging.getLogger(__name__)

DICOM = "application/dicom"


def _uid(value: str) -> dict[str, object]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _boundary(content_type: str) -> str | None:
    """The boundary of a multipart/related; type=application/dicom body, else None."""
    media = parse_media_type(content_type)
    if media.media_type != "multipart/related":
        return None
    if media.params.get("type", DICOM).lower() != DICOM:
        return None
    return media.params.get("boundary") or None


class _SpooledPart:
    """A DICOM part written to a temporary file of the store as it arrives, its bytes held
    in the request's ingest reservation (``held``, above ``base``) until it is ingested. On
    a write error (disk full) the file is deleted and the rest of the part read and
    dropped, as C-STORE does: ``complete`` then gives the rejection."""

    def __init__(self, new_blob: Callable[[], TemporaryBlob], held: Reservation,
                 base: int) -> None:
        self.held = held
        self.base = base
        self.size = 0
        self._incoming: IncomingFile | None = None
        self._refusal: IngestResult | None = None
        try:
            self._incoming = IncomingFile(new_blob())
        except OSError as exc:
            self._refuse(exc)

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._incoming is not None:
            self.held.resize(self.base + self.size)  # before a byte is written
            await self._spool(self._incoming.write, data)

    async def complete(self) -> TemporaryBlob | IngestResult:
        """The part's whole file, for ``Store.ingest_file``, or why it was refused."""
        if self._incoming is not None:
            await self._spool(self._incoming.complete)
        if self._incoming is None:
            return cast(IngestResult, self._refusal)
        return self._incoming.blob

    def discard(self) -> None:
        """Delete the file, unless stored."""
        if self._incoming is not None:
            self._incoming.blob.discard()

    async def _spool(self, write: Callable[..., object], *args: bytes) -> None:
        try:
            await run_in_threadpool(write, *args)
        except BlobTooLargeError as exc:  # a preamble added past the limit
            raise PartTooLargeError(str(exc)) from exc
        except OSError as exc:
            self._refuse(exc)

    def _refuse(self, error: OSError) -> None:
        if error.errno != errno.ENOSPC:
            log.error("cannot write a STOW-RS part to disk: %s", error)
        self._refusal = io_failure(error)
        self.discard()
        self._incoming = None


class _SkippedPart:
    """A part that is not application/dicom: read, not kept (a failed item)."""

    async def write(self, data: bytes) -> None:
        pass


class BodyStalledError(Exception):
    """The client sent nothing of its body for longer than allowed."""


async def _without_stalls(chunks: AsyncIterator[bytes], seconds: float
                          ) -> AsyncIterator[bytes]:
    """``chunks``, each within ``seconds`` of the one before: BodyStalledError past it."""
    iterator = aiter(chunks)
    while True:
        with anyio.move_on_after(seconds) as waited:
            chunk = await anext(iterator, None)
        if waited.cancelled_caught:
            raise BodyStalledError(f"no byte of the body for {seconds:g} s "
                                   "(http_body_timeout_seconds)")
        if chunk is None:
            return
        yield chunk


async def store_instances(request: Request) -> Response:
    """POST /studies[/{study}]."""
    if problem := check_uids(request):
        return problem
    content_type = request.headers.get("content-type", "")
    try:
        boundary = _boundary(content_type)
    except ValueError:
        boundary = None
    if boundary is None:
        return error(415, 'send multipart/related; type="application/dicom"; boundary=...')
    store: Store = services_of(request).store
    budget: ResourceBudget = services_of(request).budget
    root = services_of(request).dicomweb_root
    limit = services_of(request).max_instance_bytes
    expected = {"StudyInstanceUID": request.path_params["study"]} \
        if "study" in request.path_params else None
    source = f"STOW-RS {request.client.host if request.client else '?'}"
    stored: list[dict[str, object]] = []
    failed: list[dict[str, object]] = []
    study_uids: set[str] = set()
    # Ingest bytes in flight: the part being spooled (until its file is stored or deleted)
    # and the response items of the parts already read.
    held = budget.ingest.reserve(0, "this STOW-RS part")
    spooling: _SpooledPart | None = None

    def open_part(headers: dict[str, str]) -> _SpooledPart | _SkippedPart:
        nonlocal spooling
        parts = len(stored) + len(failed)
        if parts == budget.max_parts_per_request:
            raise refuse(413, "parts", f"more than {budget.max_parts_per_request} parts "
                         "in one STOW-RS request (max_parts_per_request)")
        if headers.get("content-type", DICOM).split(";")[0].strip().lower() != DICOM:
            return _SkippedPart()
        spooling = _SpooledPart(functools.partial(store.blobs.temporary, limit), held,
                                budget.part_overhead_bytes * parts)
        return spooling

    try:
        body = _without_stalls(request.stream(), services_of(request).body_timeout_seconds)
        async for _, part in iter_parts(body, boundary, limit, open_part):
            if not isinstance(part, _SpooledPart):
                failed.append({"00081197": {"vr": "US", "Value": [failure_status(None)]}})
                continue
            spooled = await part.complete()
            result = spooled if isinstance(spooled, IngestResult) else \
                await run_in_threadpool(store.ingest_file, spooled, source, expected)
            spooling = None  # stored or deleted by ingest_file
            held.resize(budget.part_overhead_bytes * (len(stored) + len(failed) + 1))
            metrics.record_ingest(result, "stow", part.size)
            record = result.record
            item = {"00081150": _uid(record.sop_class_uid if record else ""),
                    "00081155": _uid(record.sop_uid if record else "")}
            if result.accepted and record:
                study_uids.add(record.study_uid)
                item["00081190"] = {"vr": "UR", "Value": [retrieve_url(
                    root, record.study_uid, record.series_uid, record.sop_uid)]}
                stored.append(item)
            else:
                log.warning("STOW-RS part from %s refused (%s): %s", source, result.reason,
                            result.message)
                item["00081197"] = {"vr": "US", "Value": [failure_status(result.reason)]}
                failed.append(item)
    except BodyStalledError as exc:
        log.warning("STOW-RS from %s: %s, after %d stored", source, exc, len(stored))
        return error(408, str(exc))  # the rest of the body is not read: the connection ends
    except ClientDisconnect:
        log.info("STOW-RS from %s: the client left mid-body after %d stored", source,
                 len(stored))
        return error(400, "the client disconnected")  # nobody to read it; ends the request
    except (MultipartError, OverBudget) as exc:
        if not stored:
            if isinstance(exc, OverBudget):
                return over_budget(exc)
            if isinstance(exc, PartTooLargeError):
                return error(413, f"a part is larger than the {limit} bytes accepted"
                                  f" (max_instance_bytes): {exc}")
            return error(400, f"malformed multipart body: {exc}")
        log.warning("STOW-RS from %s cut short: %s", source, exc)
        failed.append({"00081197": {"vr": "US", "Value": [failure_status(None)]}})
    finally:
        if spooling is not None:  # refused, or the request ended, while it arrived
            spooling.discard()
        held.release()
    if not stored and not failed:
        return error(400, "the body holds no instance")
    # Retrieve URL (0008,1190) is Type 2 (PS3.18 Table I.1-1): the study's when what was
    # stored is of one study, present and empty when of several or when nothing was.
    body: dict[str, object] = {"00081190": {"vr": "UR", "Value": [
        retrieve_url(root, study_uids.pop())]} if len(study_uids) == 1 else {"vr": "UR"}}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    response = await run_in_threadpool(json_response, request, body)  # up to megabytes
    response.status_code = 200 if not failed else 202 if stored else 409
    return response
