"""Rendered resources: WADO-RS /rendered (PS3.18 10.4.1.1.4, query parameters 8.3.5) and
WADO-URI (PS3.18 9) images, through ``gateway.render`` in a bounded worker pool."""

import os
from dataclasses import replace
from pathlib import Path

import anyio.to_thread
from anyio import CapacityLimiter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.deidentify import deidentify
from gateway.render import MEDIA_TYPES, RenderError, RenderParams, render
from gateway.transcode import choose_syntax, transcode
from gateway.web.accept import BadAcceptError, parse_accept
from gateway.web.frames import parse_frame_list
from gateway.web.multipart import closing, new_boundary, part_head
from gateway.web.responses import entity_tag, error, not_modified
from gateway.web.wado import check_uids
from storage.index import StoredInstance
from storage.store import Store
from storage.uids import is_valid_uid

# Decoding and encoding hold a core each: more threads would only queue inside numpy.
_RENDER_LIMITER = CapacityLimiter(max(2, os.cpu_count() or 2))
_VOI_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}


class BadRenderRequestError(ValueError):
    """Rendering parameters that cannot be honoured (HTTP 400)."""


def _numbers(text: str, name: str, count: tuple[int, ...]) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise BadRenderRequestError(f"{name} must be comma-separated numbers") from None
    if len(values) not in count:
        raise BadRenderRequestError(f"{name} takes {' or '.join(map(str, count))} values")
    return values


def _media_type(accept: str | None, requested: str | None = None) -> str:
    if requested is not None:
        if requested not in MEDIA_TYPES:
            raise BadRenderRequestError(f"contentType {requested[:40]!r} is not one of "
                                        f"{', '.join(MEDIA_TYPES)} or application/dicom")
        return requested
    for media in parse_accept(accept):
        if media.media_type in MEDIA_TYPES:
            return media.media_type
        if media.media_type in ("*/*", "image/*"):
            return "image/jpeg"
    raise BadAcceptError("rendered images are image/jpeg, image/png or image/gif")


def rendered_params(request: Request, frame: int) -> RenderParams:
    """RenderParams from WADO-RS query parameters (PS3.18 8.3.5.1)."""
    query = request.query_params
    window = None
    if "window" in query:
        parts = query["window"].split(",")
        center, width = _numbers(",".join(parts[:2]), "window", (2,))
        function = _VOI_FUNCTIONS.get(parts[2].strip().lower() if len(parts) > 2 else "linear")
        if function is None:
            raise BadRenderRequestError("window function must be linear, linear-exact or sigmoid")
        window = (center, width, function)
    viewport = region = None
    if "viewport" in query:
        values = _numbers(query["viewport"], "viewport", (2, 6))
        viewport = (int(values[0]), int(values[1]))
        if min(viewport) < 1:
            raise BadRenderRequestError("viewport sizes must be positive")
    quality = int(_numbers(query.get("quality", "90"), "quality", (1,))[0])
    if not 1 <= quality <= 100:
        raise BadRenderRequestError("quality must be from 1 to 100")
    return RenderParams(frame=frame, window=window, viewport=viewport, region=region,
                        media_type=_media_type(request.headers.get("accept")), quality=quality)


async def _render(store: Store, instance: StoredInstance, params: RenderParams) -> bytes:
    path: Path = store.blobs.absolute(instance.path)
    return await anyio.to_thread.run_sync(render, path, params, limiter=_RENDER_LIMITER)


async def _instance(request: Request) -> StoredInstance | None:
    params = request.path_params
    found = await run_in_threadpool(request.app.state.store.index.instances, params["study"],
                                    params["series"], params["instance"])
    return found[0] if found else None


async def _respond(request: Request, instance: StoredInstance,
                   params_for: list[RenderParams]) -> Response:
    etag = entity_tag(instance.sop_uid, instance.received_at, *params_for)
    if unchanged := not_modified(request, etag):
        return unchanged
    try:
        images = [await _render(request.app.state.store, instance, p) for p in params_for]
    except RenderError as exc:
        return error(422, str(exc))
    media = params_for[0].media_type
    headers = {"ETag": etag}
    if len(images) == 1:
        return Response(images[0], media_type=media, headers=headers)
    boundary = new_boundary()
    body = b"".join(part_head(boundary, media, len(image), i == 0) + image
                    for i, image in enumerate(images)) + closing(boundary)
    headers["Content-Type"] = f'multipart/related; type="{media}"; boundary={boundary}'
    return Response(body, headers=headers)


async def rendered(request: Request) -> Response:
    """GET .../instances/{instance}/rendered and .../frames/{frames}/rendered."""
    if problem := check_uids(request):
        return problem
    instance = await _instance(request)
    if instance is None:
        return error(404, "no such instance")
    if instance.frames is None:
        return error(422, "this instance has no pixel data to render")
    try:
        frames = (parse_frame_list(request.path_params["frames"])
                  if "frames" in request.path_params else list(range(1, instance.frames + 1)))
        base = rendered_params(request, 1)
    except BadAcceptError as exc:
        return error(406, str(exc))
    except ValueError as exc:
        return error(400, str(exc))
    if max(frames) > instance.frames:
        return error(404, f"the instance has {instance.frames} frame(s)")
    return await _respond(request, instance, [replace(base, frame=n) for n in frames])


def _uri_params(request: Request) -> tuple[dict[str, str], RenderParams | None]:
    """Identifiers and, for an image contentType, the RenderParams of a WADO-URI request."""
    query = request.query_params
    if query.get("requestType") != "WADO":
        raise BadRenderRequestError("requestType must be WADO")
    uids = {key: query.get(key, "") for key in ("studyUID", "seriesUID", "objectUID")}
    for key, value in uids.items():
        if not is_valid_uid(value):
            raise BadRenderRequestError(f"{key} must be a valid UID")
    content_type = query.get("contentType", "image/jpeg").split(",")[0].strip()
    if content_type == "application/dicom":
        return uids, None
    window = None
    if "windowCenter" in query or "windowWidth" in query:
        center = _numbers(query.get("windowCenter", ""), "windowCenter", (1,))[0]
        width = _numbers(query.get("windowWidth", ""), "windowWidth", (1,))[0]
        window = (center, width, "LINEAR")
    viewport = None
    if "rows" in query or "columns" in query:
        rows = int(_numbers(query.get("rows", "65535"), "rows", (1,))[0])
        columns = int(_numbers(query.get("columns", "65535"), "columns", (1,))[0])
        viewport = (columns, rows)
    region = None
    if "region" in query:
        x1, y1, x2, y2 = _numbers(query["region"], "region", (4,))
        if not 0 <= x1 < x2 <= 1 or not 0 <= y1 < y2 <= 1:
            raise BadRenderRequestError("region is x1,y1,x2,y2 with 0 <= x1 < x2 <= 1")
        region = (x1, y1, x2, y2)
    quality = int(_numbers(query.get("imageQuality", "90"), "imageQuality", (1,))[0])
    if not 1 <= quality <= 100:
        raise BadRenderRequestError("imageQuality must be from 1 to 100")
    frame = int(_numbers(query.get("frameNumber", "1"), "frameNumber", (1,))[0])
    return uids, RenderParams(frame=frame, window=window, viewport=viewport, region=region,
                              media_type=_media_type(None, content_type), quality=quality)


async def wado_uri(request: Request) -> Response:
    """GET /wado?requestType=WADO&studyUID=&seriesUID=&objectUID=&contentType=..."""
    anonymize = request.query_params.get("anonymize", "no")
    try:
        uids, params = _uri_params(request)
        if anonymize not in ("yes", "no"):
            raise BadRenderRequestError("anonymize must be yes or no")
        if anonymize == "yes" and params is not None:
            raise BadRenderRequestError("anonymize=yes applies to contentType=application/dicom")
    except ValueError as exc:
        return error(400, str(exc))
    store: Store = request.app.state.store
    found = await run_in_threadpool(store.index.instances, uids["studyUID"], uids["seriesUID"],
                                    uids["objectUID"])
    if not found:
        return error(404, "no such object")
    instance = found[0]
    if params is not None:
        if instance.frames is None:
            return error(422, "this object has no pixel data to render")
        return await _respond(request, instance, [params])
    wanted = request.query_params.get("transferSyntax", "1.2.840.10008.1.2.1")
    syntax = choose_syntax(instance.transfer_syntax, instance.frames is not None, [wanted])
    if syntax is None:
        return error(406, f"cannot provide transfer syntax {wanted[:64]}")
    data = await run_in_threadpool(store.blobs.read, instance.path)
    try:
        if syntax != instance.transfer_syntax:
            data = await run_in_threadpool(transcode, data, syntax)
        if anonymize == "yes":
            data = await run_in_threadpool(deidentify, data, request.app.state.deidentify_key)
    except Exception as exc:  # decoder or de-identification failure on one object
        return error(422, f"cannot prepare this object: {exc}")
    return Response(data, media_type="application/dicom")
