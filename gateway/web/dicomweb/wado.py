"""WADO-RS retrieve of studies, series and instances (PS3.18 10.4), streamed part by part.

When every instance is sent as stored, their files are opened before the response starts
and its Content-Length is the exact length of the body (``stored_files``: what is sent is
what was measured, even if a file is replaced or deleted meanwhile); a response that
converts an instance, or finds no room for the descriptors, is sent chunked.
"""

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.imaging.budget import ResourceBudget
from gateway.imaging.transcode import choose_syntax, transcode_file
from gateway.web.dicomweb.stored_files import (
    READ_CHUNK,
    HeldFiles,
    OpenedFile,
    chunks,
    ensure_local,
    hold_files,
    open_file,
)
from gateway.web.dicomweb.validators import conditional, validator_headers
from gateway.web.http.accept import BadAcceptError, dicom_transfer_syntaxes, parse_accept
from gateway.web.http.multipart import body_length, closing, new_boundary, part_head
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import entity_tag, error
from gateway.web.middleware.manifest_scope import scoped_instances
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.store import Store
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)

SUPPORTED = 'multipart/related; type="application/dicom"'


def check_uids(request: Request) -> Response | None:
    """400 for a UID of the request's target that is not a UID (PS3.5 9.1)."""
    target = target_of(request)
    for name, value in (("study", target.study), ("series", target.series),
                        ("instance", target.instance)):
        if value is not None and not is_valid_uid(value):
            return error(400, f"invalid {name} UID {value[:80]!r}")
    return None


async def addressed_instances(request: Request) -> list[StoredInstance]:
    """The instances the request's target names (study, series or instance), only those its
    manifest references when one scopes it, their files retrieved from a PACS first when
    they are not here (HTTPException 503 if that fails: ``ensure_local``)."""
    target = target_of(request)
    if target.study is None:  # not one of the routes this serves, which all name a study
        return []
    query = (services_of(request).store.index.instances, target.study, target.series,
             target.instance, scoped_instances(request))
    found = await run_in_threadpool(*query)
    if await ensure_local(request, found):  # given back by a PACS: read as stored again
        found = await run_in_threadpool(*query)
    return found


def slices(data: bytes | bytearray) -> Iterator[memoryview]:
    """``data`` in views of ``READ_CHUNK`` bytes: the server copies one at a time (h11
    joins what it sends), never a whole frame or part."""
    view = memoryview(data)
    for start in range(0, len(view), READ_CHUNK):
        yield view[start:start + READ_CHUNK]


async def _stream(store: Store, budget: ResourceBudget, plan: list[tuple[StoredInstance, str]],
                  boundary: str, held: HeldFiles | None) -> AsyncIterator[bytes | memoryview]:
    """The multipart body: each instance's part, from its file in ``held`` (opened before
    the response, those missing there left out) or else opened as it comes."""
    first = True
    for instance, syntax in plan:
        content_type = f"application/dicom; transfer-syntax={syntax}"
        if syntax == instance.transfer_syntax:
            if held is not None:
                opened = held.files.get(instance.sop_uid)
            else:
                opened = await _open_now(store, instance)
            if opened is None:
                continue
            try:
                yield part_head(boundary, content_type, opened.size, first)
                async for chunk in chunks(opened):
                    yield chunk
            finally:
                if held is None:
                    opened.close()
        else:
            try:
                data, reserved = await budget.decode.run(
                    transcode_file, store.blobs.absolute(instance.path), syntax, budget)
            except Exception as exc:  # a decoder failing on one instance ends nothing else
                log.error("cannot convert %s to %s: %s", instance.sop_uid, syntax, exc)
                continue
            try:
                yield part_head(boundary, content_type, len(data), first)
                for piece in slices(data):
                    yield piece
            finally:  # after the last slice was sent, or the client left
                del data
                reserved.release()
        first = False
    yield closing(boundary)


async def _open_now(store: Store, instance: StoredInstance) -> OpenedFile | None:
    """The file of ``instance`` opened and measured; None once deleted (logged)."""
    try:
        return await run_in_threadpool(open_file, store.blobs.absolute(instance.path))
    except FileNotFoundError:
        log.warning("%s was deleted before it could be sent", instance.sop_uid)
        return None


class _HeldFilesResponse(StreamingResponse):
    """A StreamingResponse that closes its ``held`` files once done, whether the body was
    sent whole, cut, or never started (the client left)."""

    def __init__(self, content: AsyncIterator[bytes | memoryview], held: HeldFiles | None,
                 headers: dict[str, str]) -> None:
        super().__init__(content, headers=headers)
        self.held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:  # the body's finally blocks close the file it opened itself
                await cast(AsyncGenerator[Any, None], self.body_iterator).aclose()
            finally:
                if self.held is not None:
                    self.held.close()


async def _hold_native(store: Store, plan: list[tuple[StoredInstance, str]]
                       ) -> HeldFiles | None:
    """Every file of ``plan`` opened, when each is sent as stored and the process has room
    for their descriptors; None otherwise (the sizes of the parts are not all known)."""
    if any(syntax != instance.transfer_syntax for instance, syntax in plan):
        return None
    paths = {instance.sop_uid: store.blobs.absolute(instance.path) for instance, _ in plan}
    return await run_in_threadpool(hold_files, paths)


async def retrieve(request: Request) -> Response:
    """GET /studies/{study}[/series/{series}[/instances/{instance}]]: the instances as
    multipart/related application/dicom parts, in a negotiated transfer syntax."""
    store: Store = services_of(request).store
    if problem := check_uids(request):
        return problem
    try:
        acceptable = dicom_transfer_syntaxes(parse_accept(request.headers.get("accept")))
    except BadAcceptError as exc:
        return error(400, str(exc))
    if not acceptable:
        return error(406, f"instances are returned as {SUPPORTED}")
    instances = await addressed_instances(request)
    if not instances:
        return error(404, f"no such {target_of(request).level}")
    plan = [(i, choose_syntax(i.transfer_syntax, i.frames is not None, acceptable))
            for i in instances]
    sendable = [(i, syntax) for i, syntax in plan if syntax is not None]
    if not sendable:
        stored = sorted({i.transfer_syntax for i in instances})
        return error(406, "cannot convert the stored transfer syntax "
                     f"({', '.join(stored)}) to any acceptable one ({', '.join(acceptable)})")
    etag = entity_tag(*((i.sop_uid, i.received_at, syntax) for i, syntax in sendable))
    if unchanged := conditional(request, [i for i, _ in sendable], etag):
        return unchanged
    boundary = new_boundary()
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    syntaxes = {syntax for _, syntax in sendable}
    if len(syntaxes) == 1:
        content_type += f"; transfer-syntax={syntaxes.pop()}"
    headers = {"Content-Type": content_type,
               **validator_headers([i for i, _ in sendable], etag)}
    if len(sendable) < len(plan):
        headers["Warning"] = (f'299 passerelle "{len(plan) - len(sendable)} instance(s) '
                              'not available in an acceptable transfer syntax"')
    held = await _hold_native(store, sendable)
    if held is not None and not held.files:
        held.close()
        return error(404, f"no such {target_of(request).level}: deleted meanwhile")
    if held is not None:  # every part's size known: no chunked encoding
        headers["Content-Length"] = str(body_length(boundary, (
            (f"application/dicom; transfer-syntax={syntax}", held.files[i.sop_uid].size)
            for i, syntax in sendable if i.sop_uid in held.files)))
    body = _stream(store, services_of(request).budget, sendable, boundary, held)
    return _HeldFilesResponse(body, held, headers)
