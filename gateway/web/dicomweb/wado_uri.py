"""WADO-URI (PS3.18 9): one object as DICOM, optionally transcoded or de-identified, or as
a rendered image."""

from pathlib import Path

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from gateway.imaging.budget import OverBudget, Reservation, ResourceBudget, reserve_conversion
from gateway.imaging.deidentify import deidentify
from gateway.imaging.transcode import choose_syntax, transcode
from gateway.web.dicomweb.render_params import BadRenderRequestError, uri_params
from gateway.web.dicomweb.rendered import respond
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import error, over_budget
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
