"""WADO-RS metadata (PS3.18 10.4.1.1.2): DICOM JSON (PS3.18 Annex F) of stored instances."""

from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import DataElement
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.web.responses import error, json_response
from gateway.web.wado import check_uids, level_name
from storage.index import StoredInstance
from storage.store import Store

# Binary values (OB, OW, UN, ...) longer than this are sent as BulkDataURI (Annex F.2.6).
BULK_DATA_THRESHOLD = 1024


def instance_url(base: str, instance: StoredInstance) -> str:
    """The WADO-RS URL of an instance under ``base`` (the /dicom-web root)."""
    return (f"{base}/studies/{instance.study_uid}/series/{instance.series_uid}"
            f"/instances/{instance.sop_uid}")


def instance_json(path: Path, url: str, has_pixels: bool) -> dict[str, object]:
    """The DICOM JSON object of one stored instance, bulk data as BulkDataURI."""
    ds = dcmread(path, stop_before_pixels=True)

    def bulk_uri(element: DataElement) -> str:
        return f"{url}/bulkdata/{element.tag:08X}"

    body = ds.to_json_dict(BULK_DATA_THRESHOLD, bulk_uri)
    if has_pixels:
        # Read with stop_before_pixels, so never inlined: always a BulkDataURI.
        vr = "OB" if ds.file_meta.TransferSyntaxUID.is_encapsulated else "OW"
        body["7FE00010"] = {"vr": vr, "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    return body


async def metadata(request: Request) -> Response:
    """GET .../metadata at study, series or instance level."""
    store: Store = request.app.state.store
    if problem := check_uids(request):
        return problem
    params = request.path_params
    instances = await run_in_threadpool(store.index.instances, params["study"],
                                        params.get("series"), params.get("instance"))
    if not instances:
        return error(404, f"no such {level_name(params)}")
    base = request.app.state.public_url + "/dicom-web"

    def build() -> list[dict[str, object]]:
        return [instance_json(store.blobs.absolute(i.path), instance_url(base, i),
                              i.frames is not None) for i in instances]

    return json_response(request, await run_in_threadpool(build))
