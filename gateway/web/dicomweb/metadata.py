"""WADO-RS metadata (PS3.18 10.4.1.1.2): DICOM JSON (PS3.18 Annex F) of stored instances."""

import json
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.imaging.budget import OverBudget, Reservation, ResourceBudget
from gateway.urls import ItemStep, bulkdata_url, retrieve_url
from gateway.web.dicomweb.bulkdata import PIXEL_DATA
from gateway.web.dicomweb.wado import check_uids
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import error, json_bytes_response, over_budget
from gateway.web.middleware.manifest_scope import scoped_instances
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.store import Store

# Binary values (OB, OW, UN, ...) longer than this are sent as BulkDataURI (Annex F.2.6).
BULK_DATA_THRESHOLD = 1024
# Instances whose JSON one decode worker computes at a time.
_BATCH = 16
# Stands for the /dicom-web root URL in cached JSON.
_BASE_TOKEN = "urn:passerelle:dicomweb-root:2"
# In the JSON cached before bulk data URIs named the elements inside sequences by their
# path (they named a top-level tag): such a text is computed again.
_STALE = '"urn:passerelle:dicomweb-root/'


def dataset_json(ds: Dataset, url: str, steps: tuple[ItemStep, ...] = ()) -> dict[str, Any]:
    """The DICOM JSON object of ``ds``, the item reached through ``steps`` (the top level when
    none) of the instance at ``url``: each binary value longer than the threshold a
    BulkDataURI that names its element by its whole path (``gateway.urls.bulkdata_url``)."""
    body: dict[str, Any] = {}
    for element in ds:
        if element.VR == "SQ":
            items = [dataset_json(item, url, (*steps, (element.tag, number)))
                     for number, item in enumerate(element.value, start=1)]
            body[f"{element.tag:08X}"] = {"vr": "SQ", "Value": items}
        else:
            body[f"{element.tag:08X}"] = element.to_json_dict(
                lambda bulk: bulkdata_url(url, steps, bulk.tag), BULK_DATA_THRESHOLD)
    return body


def instance_json(path: Path, url: str, has_pixels: bool, budget: ResourceBudget) -> str:
    """The DICOM JSON object of one stored instance as text, bulk data as BulkDataURI; the
    decode memory it takes is held until the text is made."""
    with budget.reserve_header_read(path, as_json=True):
        ds = dcmread(path, stop_before_pixels=True)
        body = dataset_json(ds, url)
        if has_pixels:
            # Read with stop_before_pixels, so never inlined: always a BulkDataURI.
            vr = "OB" if ds.file_meta.TransferSyntaxUID.is_encapsulated else "OW"
            body["7FE00010"] = {"vr": vr, "BulkDataURI": bulkdata_url(url, (), PIXEL_DATA)}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _missing_json(store: Store, missing: list[StoredInstance], budget: ResourceBudget,
                  held: Reservation) -> dict[str, str]:
    """Compute and cache the JSON text of instances not cached yet, each added to the
    response's reservation ``held`` once made."""
    texts: dict[str, str] = {}
    for i in missing:
        text = instance_json(store.blobs.absolute(i.path), retrieve_url(
            _BASE_TOKEN, i.study_uid, i.series_uid, i.sop_uid), i.frames is not None, budget)
        held.resize(held.size + _RESPONSE_FACTOR * len(text))
        texts[i.sop_uid] = text
    store.index.cache_metadata(list(texts.items()))
    return texts


async def metadata(request: Request) -> Response:
    """GET .../metadata at study, series or instance level.

    Each instance's JSON is computed once, from its header, and cached in the index with a
    placeholder for the base URL (which comes from the settings at response time). What the
    response holds is reserved before the cached texts are loaded, from their sizes.
    """
    store: Store = services_of(request).store
    if problem := check_uids(request):
        return problem
    target = target_of(request)
    scope = (target.study, target.series, target.instance, scoped_instances(request))
    budget = services_of(request).budget
    try:
        held = await budget.decode.run(_reserve_cached, store, scope, budget)
    except OverBudget as refusal:
        return over_budget(refusal)
    try:
        rows = await run_in_threadpool(store.index.instances_with_metadata, *scope)
        if not rows:
            held.release()
            return error(404, f"no such {target.level}")
        missing = [instance for instance, text in rows if text is None or _STALE in text]
        computed: dict[str, str] = {}
        # In batches, so that a large study does not hold a decode worker for long.
        for start in range(0, len(missing), _BATCH):
            computed |= await budget.decode.run(_missing_json, store,
                                                missing[start:start + _BATCH], budget, held)
        texts = [computed.get(instance.sop_uid) or text or "" for instance, text in rows]
        response = await budget.decode.run(_response, request, texts,
                                           services_of(request).dicomweb_root)
    except OverBudget as refusal:
        held.release()
        return over_budget(refusal)
    except BaseException:
        held.release()
        raise
    response.background = BackgroundTask(held.release)
    return response


# What a response holds per character of the texts: the texts, joined, with the URLs
# replaced, encoded, and the gzip of that.
_RESPONSE_FACTOR = 5


def _reserve_cached(store: Store, scope: tuple[str | None, str | None, str | None,
                                               frozenset[str] | None],
                    budget: ResourceBudget) -> Reservation:
    study, series, instance, within = scope
    size = store.index.cached_metadata_size(study or "", series, instance, within)
    return budget.memory.reserve(_RESPONSE_FACTOR * size, "this metadata response")


def _response(request: Request, texts: list[str], base: str) -> Response:
    """The JSON array of ``texts`` with ``base`` for the root URL."""
    body = ("[" + ",".join(texts) + "]").replace(f'"{_BASE_TOKEN}/', f'"{base}/')
    return json_bytes_response(request, body.encode())
