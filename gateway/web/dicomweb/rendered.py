"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.4 and 10.4.1.1.5, query
parameters 8.3.5.1), in the rendered media types of each instance's Resource Category
(8.7.2, Table 8.7.4-1): images made by ``gateway.imaging.render``, SR documents as text
(``gateway.imaging.structured_report``), both in a bounded worker pool and kept in the
render cache; encapsulated documents streamed from the stored file. Several are a
multipart/related stream of one media type."""

import email.utils
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiofiles
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.imaging.budget import OverBudget, ResourceBudget, check_frame_list
from gateway.imaging.encapsulated import DOCUMENT_MEDIA_TYPES, DocumentPlace, locate_document
from gateway.imaging.render import RenderError, RenderParams, render
from gateway.imaging.render_cache import RenderCache, cache_key
from gateway.imaging.structured_report import (
    CONTENT_SECURITY_POLICY,
    TEXT_MEDIA_TYPES,
    is_structured_report,
    render_report,
)
from gateway.web.dicomweb.frames import parse_frame_list
from gateway.web.dicomweb.render_params import (
    IMAGE_MEDIA_TYPES,
    RS_IMAGE_PARAMETERS,
    check_image_parameters,
    media_type,
    negotiate,
    offered_media_types,
    rendered_params,
)
from gateway.web.dicomweb.wado import READ_CHUNK, addressed_instances, check_uids
from gateway.web.http.accept import BadAcceptError, NotAcceptableError, parse_accept
from gateway.web.http.multipart import closing, new_boundary, part_head
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import entity_tag, error, not_modified, over_budget
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.store import Store

log = logging.getLogger(__name__)
# XML from outside (an encapsulated CDA, or the text of an SR) opened by a browser may
# carry XHTML script: nothing in it may run or load, and it gets an origin of its own.
# Encapsulated PDFs get no policy: the browsers' PDF viewers do not start in a sandboxed
# document (Chromium shows a blank page, crbug.com/413851; Safari's viewer runs script),
# and default-src 'none' breaks the page of Chromium's viewer (crbug.com/271452). A PDF's
# own JavaScript runs in the viewer, apart from the gateway's origin, and nosniff keeps it
# a PDF. It is named as an attachment would be (inline: shown, saved under that name).
XML_CONTENT_SECURITY_POLICY = "default-src 'none'; sandbox"


async def render_image(request: Request, instance: StoredInstance,
                       params: RenderParams) -> bytes:
    """One rendered frame, or SR document as text, from the cache or rendered once in the
    decode pool, within the resource budget (OverBudget when not)."""
    store: Store = services_of(request).store
    cache: RenderCache = services_of(request).render_cache
    budget: ResourceBudget = services_of(request).budget
    path = store.blobs.absolute(instance.path)

    async def produce() -> bytes:
        if is_structured_report(instance.sop_class_uid):
            return await budget.decode.run(render_report, path, params.media_type, budget)
        return await budget.decode.run(render, path, params, budget)

    return await cache.get(cache_key(instance.sop_uid, instance.received_at, params), produce)


def content_type(media: str) -> str:
    """The Content-Type of a rendered part: the text we write is UTF-8."""
    return f"{media}; charset=utf-8" if media.startswith("text/") and media != "text/xml" \
        else media


async def respond(request: Request, plan: list[tuple[StoredInstance, RenderParams]]) -> Response:
    """One rendering, or a multipart/related stream of them (PS3.18 8.7.4), with an ETag.

    The first is rendered (or located) before the response starts, so that one that cannot
    be is a 422 rather than a broken stream.
    """
    etag = entity_tag(*((i.sop_uid, i.received_at, p) for i, p in plan))
    newest = max(instance.received_at for instance, _ in plan)
    headers = {"ETag": etag, "Last-Modified": email.utils.formatdate(newest, usegmt=True),
               "X-Content-Type-Options": "nosniff"}
    if unchanged := not_modified(request, etag):
        return unchanged
    media = plan[0][1].media_type
    if media == "text/html":  # SR text is outside input: nothing in it may run
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    elif media == "text/xml":
        headers["Content-Security-Policy"] = XML_CONTENT_SECURITY_POLICY
    if plan[0][0].sop_class_uid in DOCUMENT_MEDIA_TYPES:
        return await _documents(request, [instance for instance, _ in plan], headers)
    try:
        first = await render_image(request, *plan[0])
    except RenderError as exc:
        return error(422, str(exc))
    except OverBudget as refusal:
        return over_budget(refusal)
    if len(plan) == 1:
        headers["Content-Type"] = content_type(media)
        return Response(first, headers=headers)
    boundary = new_boundary()

    async def parts() -> AsyncIterator[bytes]:
        yield part_head(boundary, content_type(media), len(first), True) + first
        for instance, params in plan[1:]:
            try:
                image = await render_image(request, instance, params)
            except (RenderError, OverBudget) as exc:  # the status is sent: end unclosed
                log.warning("rendered stream cut at %s frame %d: %s", instance.sop_uid,
                            params.frame, exc)
                return
            yield part_head(boundary, content_type(media), len(image), False) + image
        yield closing(boundary)

    headers["Content-Type"] = f'multipart/related; type="{media}"; boundary={boundary}'
    return StreamingResponse(parts(), headers=headers)


async def _locate(request: Request, instance: StoredInstance) -> tuple[Path, DocumentPlace]:
    budget: ResourceBudget = services_of(request).budget
    path = services_of(request).store.blobs.absolute(instance.path)
    return path, await budget.decode.run(locate_document, path, budget)


async def _document_bytes(path: Path, place: DocumentPlace) -> AsyncIterator[bytes]:
    """The document's bytes, from memory or read from the file in slices."""
    if place.data is not None:
        yield place.data
        return
    left = place.length
    async with aiofiles.open(path, "rb") as stored:
        await stored.seek(place.offset)
        while left > 0 and (chunk := await stored.read(min(READ_CHUNK, left))):
            left -= len(chunk)
            yield chunk
    if left:  # the file ended early: the client sees the body cut
        log.warning("encapsulated document of %s cut: %d bytes missing", path.name, left)


async def _documents(request: Request, instances: list[StoredInstance],
                     headers: dict[str, str]) -> Response:
    """Encapsulated documents as themselves, streamed from the stored files."""
    media = DOCUMENT_MEDIA_TYPES[instances[0].sop_class_uid]
    try:
        path, place = await _locate(request, instances[0])
    except RenderError as exc:
        return error(422, str(exc))
    except OverBudget as refusal:
        return over_budget(refusal)
    if len(instances) == 1:
        headers["Content-Length"] = str(place.length)
        # As is, no charset added: a CDA's XML declaration names its encoding, which a
        # charset parameter would override (RFC 7303 3.2).
        headers["Content-Type"] = media
        if media == "application/pdf":
            headers["Content-Disposition"] = \
                f'inline; filename="{instances[0].sop_uid}.pdf"'
        return StreamingResponse(_document_bytes(path, place), headers=headers)
    boundary = new_boundary()

    async def parts() -> AsyncIterator[bytes]:
        first, located = True, (path, place)
        for index, instance in enumerate(instances):
            if index:
                try:
                    located = await _locate(request, instance)
                except (RenderError, OverBudget) as exc:  # the status is sent: end unclosed
                    log.warning("rendered stream cut at %s: %s", instance.sop_uid, exc)
                    return
            yield part_head(boundary, media, located[1].length, first)
            async for chunk in _document_bytes(*located):
                yield chunk
            first = False
        yield closing(boundary)

    headers["Content-Type"] = f'multipart/related; type="{media}"; boundary={boundary}'
    return StreamingResponse(parts(), headers=headers)


async def _addressed(request: Request) -> list[StoredInstance] | Response:
    """The instances that the path addresses, or an error response."""
    if problem := check_uids(request):
        return problem
    found = await addressed_instances(request)
    if not found:
        return error(404, f"no such {target_of(request).level}")
    return found


def _images(request: Request, found: list[StoredInstance]) -> list[StoredInstance] | Response:
    """The instances with pixels among ``found``, or a 422."""
    images = [instance for instance in found if instance.frames is not None]
    if not images:
        return error(422, f"this {target_of(request).level} has no pixel data to render")
    return images


def _renderable(request: Request, found: list[StoredInstance]
                ) -> tuple[list[StoredInstance], str] | Response:
    """The instances to render and their media type: the first the Accept header asks for
    that an addressed instance offers (for ``*/*``: images, else SR documents, else
    documents, each category's default), and every instance of that category (PS3.18
    8.7.4, 8.7.5); 406 when none is acceptable, 422 when nothing can be rendered."""
    kinds = {offered_media_types(instance) for instance in found} - {()}
    if not kinds:
        return error(422, f"this {target_of(request).level} has nothing to render (no pixel "
                     "data, no report, no document)")
    ranked = [k for k in (IMAGE_MEDIA_TYPES, TEXT_MEDIA_TYPES, *sorted(kinds)) if k in kinds]
    try:
        media = negotiate(parse_accept(request.headers.get("accept")),
                          tuple(dict.fromkeys(m for kind in ranked for m in kind)))
    except BadAcceptError as exc:
        return error(400, str(exc))
    except NotAcceptableError as exc:
        return error(406, str(exc))
    kind = next(kind for kind in ranked if media in kind)
    return [i for i in found if offered_media_types(i) == kind], media


def _params(request: Request, media: str | None) -> RenderParams | Response:
    """The query's rendering parameters for ``media`` (a thumbnail when None)."""
    try:
        if media is None:
            return rendered_params(request.query_params, media_type(
                request.headers.get("accept")), thumbnail=True)
        check_image_parameters(request.query_params, RS_IMAGE_PARAMETERS, media)
        return rendered_params(request.query_params, media)
    except BadAcceptError as exc:
        return error(406, str(exc))
    except ValueError as exc:
        return error(400, str(exc))


def _frame_numbers(request: Request, instance: StoredInstance) -> list[int] | Response | None:
    """The frames the path names (None when it names none), or a 400/404 response."""
    if "frames" not in request.path_params:
        return None
    try:
        numbers = parse_frame_list(request.path_params["frames"])
    except ValueError as exc:
        return error(400, f"bad frame list: {exc}")
    count = instance.frames or 1
    try:
        check_frame_list(numbers, count)
    except OverBudget as refusal:
        return over_budget(refusal)
    if max(numbers) > count:
        return error(404, f"the instance has {count} frame(s)")
    return numbers


async def rendered(request: Request) -> Response:
    """GET {study}[/series/{series}[/instances/{instance}[/frames/{frames}]]]/rendered:
    every frame of the images, or every report or document, that the path addresses."""
    found = await _addressed(request)
    if isinstance(found, Response):
        return found
    if "frames" in request.path_params:  # frames are of images only
        found = _images(request, found)
        if isinstance(found, Response):
            return found
    chosen = _renderable(request, found)
    if isinstance(chosen, Response):
        return chosen
    instances, media = chosen
    base = _params(request, media)
    if isinstance(base, Response):
        return base
    if media not in IMAGE_MEDIA_TYPES:
        return await respond(request, [(instance, base) for instance in instances])
    numbers = _frame_numbers(request, instances[0])
    if isinstance(numbers, Response):
        return numbers
    plan = [(instance, replace(base, frame=n)) for instance in instances
            for n in (numbers or range(1, (instance.frames or 1) + 1))]
    return await respond(request, plan)


async def thumbnail(request: Request) -> Response:
    """GET .../thumbnail at every level: one small image of a representative frame, the
    middle instance of the first series with pixels, its middle frame."""
    found = await _addressed(request)
    if isinstance(found, Response):
        return found
    images = _images(request, found)
    if isinstance(images, Response):
        return images
    params = _params(request, None)
    if isinstance(params, Response):
        return params
    first_series = [i for i in images if i.series_uid == images[0].series_uid]
    instance = first_series[len(first_series) // 2]
    numbers = _frame_numbers(request, instance)
    if isinstance(numbers, Response):
        return numbers
    frame = numbers[0] if numbers else ((instance.frames or 1) + 1) // 2
    return await respond(request, [(instance, replace(params, frame=frame))])
