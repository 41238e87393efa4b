"""WADO-RS retrieve of studies, series and instances (PS3.18 10.4), streamed part by part."""

import logging
from collections.abc import AsyncIterator, Iterator

import aiofiles
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.imaging.budget import ResourceBudget
from gateway.imaging.transcode import choose_syntax, transcode_file
from gateway.web.dicomweb.validators import conditional, validator_headers
from gateway.web.http.accept import BadAcceptError, dicom_transfer_syntaxes, parse_accept
from gateway.web.http.multipart import closing, new_boundary, part_head
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import entity_tag, error
from gateway.web.middleware.manifest_scope import scoped_instances
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.store import Store
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
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
    manifest references when one scopes it."""
    target = target_of(request)
    if target.study is None:  # not one of the routes this serves, which all name a study
        return []
    return await run_in_threadpool(services_of(request).store.index.instances, target.study,
                                   target.series, target.instance, scoped_instances(request))


def slices(data: bytes | bytearray) -> Iterator[memoryview]:
    """``data`` in views of ``READ_CHUNK`` bytes: the server copies one at a time (h11
    joins what it sends), never a whole frame or part."""
    view = memoryview(data)
    for start in range(0, len(view), READ_CHUNK):
        yield view[start:start + READ_CHUNK]


async def _stream(store: Store, budget: ResourceBudget, plan: list[tuple[StoredInstance, str]],
                  boundary: str) -> AsyncIterator[bytes | memoryview]:
    first = True
    for instance, syntax in plan:
        path = store.blobs.absolute(instance.path)
        content_type = f"application/dicom; transfer-syntax={syntax}"
        if syntax == instance.transfer_syntax:
            yield part_head(boundary, content_type, instance.size, first)
            async with aiofiles.open(path, "rb") as stored:
                while chunk := await stored.read(READ_CHUNK):
                    yield chunk
        else:
            try:
                data, held = await budget.decode.run(transcode_file, path, syntax, budget)
            except Exception as exc:  # a decoder failing on one instance ends nothing else
                log.error("cannot convert %s to %s: %s", instance.sop_uid, syntax, exc)
                continue
            try:
                yield part_head(boundary, content_type, len(data), first)
                for piece in slices(data):
                    yield piece
            finally:  # after the last slice was sent, or the client left
                del data
                held.release()
        first = False
    yield closing(boundary)


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
    return StreamingResponse(_stream(store, services_of(request).budget, sendable, boundary),
                             headers=headers)
