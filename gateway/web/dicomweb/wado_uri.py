"""WADO-URI (PS3.18 9): one object as DICOM, optionally transcoded or de-identified, or
rendered (9.5) in a media type of its Resource Category: an image, with the Grayscale
Softcopy Presentation State it names applied; an SR document as text; an encapsulated
document as itself."""

from dataclasses import replace
from pathlib import Path

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from gateway.imaging.budget import OverBudget, Reservation, ResourceBudget, reserve_conversion
from gateway.imaging.deidentify import deidentify
from gateway.imaging.presentation_state import (
    PresentationState,
    PresentationStateError,
    read_presentation_state,
)
from gateway.imaging.transcode import choose_syntax, transcode
from gateway.web.dicomweb.render_params import (
    IMAGE_MEDIA_TYPES,
    URI_IMAGE_PARAMETERS,
    BadRenderRequestError,
    UriRendering,
    check_image_parameters,
    negotiate,
    offered_media_types,
    uri_params,
)
from gateway.web.dicomweb.rendered import respond
from gateway.web.dicomweb.stored_files import ensure_local
from gateway.web.http.accept import NotAcceptableError
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import error, over_budget
from gateway.web.middleware.manifest_scope import scoped_instances
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.store import Store


async def wado_uri(request: Request) -> Response:
    """GET /wado?requestType=WADO&studyUID=&seriesUID=&objectUID=&contentType=..."""
    # The parameters as the request target has them: each one once (checked there), and
    # the object identified by the UIDs the access decisions read.
    target = target_of(request)
    anonymize = target.param("anonymize", "no")
    try:
        query = QueryParams(list(target.query))
        _, rendering = uri_params(query)
        if anonymize not in ("yes", "no"):
            raise BadRenderRequestError("anonymize must be yes or no")
        if anonymize == "yes" and rendering is not None:
            raise BadRenderRequestError("anonymize=yes applies to contentType=application/dicom")
    except ValueError as exc:
        return error(400, str(exc))
    store: Store = services_of(request).store
    found = await run_in_threadpool(store.index.instances, target.study, target.series,
                                    target.instance, scoped_instances(request))
    if not found:
        return error(404, "no such object")
    if await ensure_local(request, found[:1]):  # given back by a PACS: read as stored again
        found = await run_in_threadpool(store.index.instances, target.study, target.series,
                                        target.instance, scoped_instances(request))
    instance = found[0]
    if rendering is not None:
        return await _rendered(request, query, instance, rendering)
    wanted = target.param("transferSyntax", "1.2.840.10008.1.2.1")
    syntax = choose_syntax(instance.transfer_syntax, instance.frames is not None, [wanted])
    if syntax is None:
        return error(406, f"cannot provide transfer syntax {wanted[:64]}")
    path = store.blobs.absolute(instance.path)
    if syntax == instance.transfer_syntax and anonymize == "no":
        return FileResponse(path, media_type="application/dicom")  # streamed, never held
    budget = services_of(request).budget
    key = services_of(request).deidentify_key if anonymize == "yes" else None
    try:
        conversion = syntax if syntax != instance.transfer_syntax else None
        data, held = await budget.decode.run(_prepared, path, conversion, key, budget)
    except OverBudget as refusal:
        return over_budget(refusal)
    except Exception as exc:  # decoder or de-identification failure on one object
        return error(422, f"cannot prepare this object: {exc}")
    return Response(data, media_type="application/dicom", background=BackgroundTask(held.release))


def _prepared(path: Path, target: str | None, key: bytes | None,
              budget: ResourceBudget) -> tuple[bytes, Reservation]:
    """The object of ``path`` converted to ``target`` and de-identified with ``key``, when
    given, and the decode memory it holds until sent."""
    held = reserve_conversion(budget, path, "preparing this object")
    try:
        data = path.read_bytes()
        data = transcode(data, target) if target is not None else data
        return (deidentify(data, key) if key is not None else data), held
    except BaseException:
        held.release()
        raise


async def _rendered(request: Request, query: QueryParams, instance: StoredInstance,
                    rendering: UriRendering) -> Response:
    """Retrieve Rendered Instance (PS3.18 9.5): the first contentType the object's category
    offers (406 when none), image parameters for images only (9.5.1.2)."""
    offered = offered_media_types(instance)
    if not offered:
        return error(422, "this object has nothing to render (no pixel data, no report, "
                     "no document)")
    try:
        media = negotiate(rendering.accepted, offered)
        check_image_parameters(query, URI_IMAGE_PARAMETERS, media)
    except NotAcceptableError as exc:
        return error(406, str(exc))
    except BadRenderRequestError as exc:
        return error(400, str(exc))
    params = replace(rendering.params, media_type=media)
    if media in IMAGE_MEDIA_TYPES:
        if params.frame > (instance.frames or 1):
            return error(404, f"the object has {instance.frames} frame(s)")
        if rendering.presentation is not None:
            state = await _presentation_state(request, instance, rendering.presentation,
                                              params.frame)
            if isinstance(state, Response):
                return state
            params = replace(params, presentation=state)
    return await respond(request, [(instance, params)])


async def _presentation_state(request: Request, image: StoredInstance,
                              named: tuple[str, str], frame: int
                              ) -> PresentationState | Response:
    """The presentation state ``named`` (series, instance) as it applies to the frame: in
    the image's study (PS3.18 9.5.1.2.7) and within what the request may see (a
    manifest's scope), else a 404 as for any object unknown here."""
    series_uid, sop_uid = named
    store: Store = services_of(request).store
    found = await run_in_threadpool(store.index.instances, image.study_uid, series_uid,
                                    sop_uid, scoped_instances(request))
    if not found:
        return error(404, f"no presentation state {sop_uid} in series {series_uid} of "
                     "this study")
    await ensure_local(request, found[:1])
    budget: ResourceBudget = services_of(request).budget
    try:
        return await budget.decode.run(read_presentation_state,
                                       store.blobs.absolute(found[0].path), image.series_uid,
                                       image.sop_uid, frame, budget)
    except PresentationStateError as exc:
        return error(exc.status, str(exc))
    except OverBudget as refusal:
        return over_budget(refusal)
