"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.4 and 10.4.1.1.5, query
parameters 8.3.5.1): images made by ``gateway.imaging.render`` in a bounded worker pool, kept in the
render cache, and streamed as multipart/related when there are several."""

import email.utils
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.imaging.budget import OverBudget, ResourceBudget, check_frame_list
from gateway.imaging.render import RenderError, RenderParams, render
from gateway.imaging.render_cache import RenderCache, cache_key
from gateway.web.dicomweb.frames import parse_frame_list
from gateway.web.dicomweb.render_params import rendered_params
from gateway.web.dicomweb.wado import addressed_instances, check_uids
from gateway.web.http.accept import BadAcceptError
from gateway.web.http.multipart import closing, new_boundary, part_head
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import entity_tag, error, not_modified, over_budget
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.store import Store

log = logging.getLogger(__name__)


async def render_image(request: Request, instance: StoredInstance,
                       params: RenderParams) -> bytes:
    """One rendered frame, from the cache or rendered once in the decode pool, within the
    resource budget (OverBudget when not)."""
    store: Store = services_of(request).store
    cache: RenderCache = services_of(request).render_cache
    budget: ResourceBudget = services_of(request).budget
    path = store.blobs.absolute(instance.path)

    async def produce() -> bytes:
        return await budget.decode.run(render, path, params, budget)

    return await cache.get(cache_key(instance.sop_uid, instance.received_at, params), produce)


async def respond(request: Request, plan: list[tuple[StoredInstance, RenderParams]]) -> Response:
    """One image, or a multipart/related stream of them (PS3.18 8.7.4), with an ETag.

    The first image is rendered before the response starts, so that a frame that cannot
    be rendered is a 422 rather than a broken stream.
    """
    etag = entity_tag(*((i.sop_uid, i.received_at, p) for i, p in plan))
    newest = max(instance.received_at for instance, _ in plan)
    headers = {"ETag": etag, "Last-Modified": email.utils.formatdate(newest, usegmt=True)}
    if unchanged := not_modified(request, etag):
        return unchanged
    media = plan[0][1].media_type
    try:
        first = await render_image(request, *plan[0])
    except RenderError as exc:
        return error(422, str(exc))
    except OverBudget as refusal:
        return over_budget(refusal)
    if len(plan) == 1:
        return Response(first, media_type=media, headers=headers)
    boundary = new_boundary()

    async def parts() -> AsyncIterator[bytes]:
        yield part_head(boundary, media, len(first), True) + first
        for instance, params in plan[1:]:
            try:
                image = await render_image(request, instance, params)
            except (RenderError, OverBudget) as exc:  # the status is sent: end unclosed
                log.warning("rendered stream cut at %s frame %d: %s", instance.sop_uid,
                            params.frame, exc)
                return
            yield part_head(boundary, media, len(image), False) + image
        yield closing(boundary)

    headers["Content-Type"] = f'multipart/related; type="{media}"; boundary={boundary}'
    return StreamingResponse(parts(), headers=headers)


async def _images(request: Request) -> list[StoredInstance] | Response:
    """The instances with pixels that the path addresses, or an error response."""
    if problem := check_uids(request):
        return problem
    found = await addressed_instances(request)
    level = target_of(request).level
    if not found:
        return error(404, f"no such {level}")
    images = [instance for instance in found if instance.frames is not None]
    if not images:
        return error(422, f"this {level} has no pixel data to render")
    return images


def _params(request: Request, thumbnail: bool) -> RenderParams | Response:
    try:
        return rendered_params(request.query_params, request.headers.get("accept"), thumbnail)
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
    every frame of what the path addresses."""
    images = await _images(request)
    if isinstance(images, Response):
        return images
    base = _params(request, thumbnail=False)
    if isinstance(base, Response):
        return base
    numbers = _frame_numbers(request, images[0])
    if isinstance(numbers, Response):
        return numbers
    plan = [(instance, replace(base, frame=n)) for instance in images
            for n in (numbers or range(1, (instance.frames or 1) + 1))]
    return await respond(request, plan)


async def thumbnail(request: Request) -> Response:
    """GET .../thumbnail at every level: one small image of a representative frame, the
    middle instance of the first series with pixels, its middle frame."""
    images = await _images(request)
    if isinstance(images, Response):
        return images
    params = _params(request, thumbnail=True)
    if isinstance(params, Response):
        return params
    first_series = [i for i in images if i.series_uid == images[0].series_uid]
    instance = first_series[len(first_series) // 2]
    numbers = _frame_numbers(request, instance)
    if isinstance(numbers, Response):
        return numbers
    frame = numbers[0] if numbers else ((instance.frames or 1) + 1) // 2
    return await respond(request, [(instance, replace(params, frame=frame))])
