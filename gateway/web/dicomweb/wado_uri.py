"""WADO-URI (PS3.18 9): one object as DICOM, optionally transcoded or de-identified, or as
a rendered image."""

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from gateway.imaging.deidentify import deidentify
from gateway.imaging.transcode import choose_syntax, transcode
from gateway.web.dicomweb.render_params import BadRenderRequestError, uri_params
from gateway.web.dicomweb.rendered import respond
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import error
from gateway.web.middleware.manifest_scope import scoped_instances
from gateway.web.services import services_of
from storage.store import Store


async def wado_uri(request: Request) -> Response:
    """GET /wado?requestType=WADO&studyUID=&seriesUID=&objectUID=&contentType=..."""
    # The parameters as the request target has them: each one once (checked there), and
    # the object identified by the UIDs the access decisions read.
    target = target_of(request)
    anonymize = target.param("anonymize", "no")
    try:
        _, params = uri_params(QueryParams(list(target.query)))
        if anonymize not in ("yes", "no"):
            raise BadRenderRequestError("anonymize must be yes or no")
        if anonymize == "yes" and params is not None:
            raise BadRenderRequestError("anonymize=yes applies to contentType=application/dicom")
    except ValueError as exc:
        return error(400, str(exc))
    store: Store = services_of(request).store
    found = await run_in_threadpool(store.index.instances, target.study, target.series,
                                    target.instance, scoped_instances(request))
    if not found:
        return error(404, "no such object")
    instance = found[0]
    if params is not None:
        if instance.frames is None:
            return error(422, "this object has no pixel data to render")
        if params.frame > instance.frames:
            return error(404, f"the object has {instance.frames} frame(s)")
        return await respond(request, [(instance, params)])
    wanted = target.param("transferSyntax", "1.2.840.10008.1.2.1")
    syntax = choose_syntax(instance.transfer_syntax, instance.frames is not None, [wanted])
    if syntax is None:
        return error(406, f"cannot provide transfer syntax {wanted[:64]}")
    data = await run_in_threadpool(store.blobs.read, instance.path)
    try:
        if syntax != instance.transfer_syntax:
            data = await run_in_threadpool(transcode, data, syntax)
        if anonymize == "yes":
            data = await run_in_threadpool(deidentify, data, services_of(request).deidentify_key)
    except Exception as exc:  # decoder or de-identification failure on one object
        return error(422, f"cannot prepare this object: {exc}")
    return Response(data, media_type="application/dicom")
