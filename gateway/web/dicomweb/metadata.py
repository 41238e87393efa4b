"""WADO-RS metadata (PS3.18 10.4.1.1.2) of stored instances: DICOM JSON (PS3.18 Annex F) or
the Native DICOM Model (PS3.19 A.1)."""

import enum
import gzip
import hashlib
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
from gateway.web.dicomweb.native_xml import native_xml
from gateway.web.dicomweb.validators import conditional, validator_headers
from gateway.web.dicomweb.wado import check_uids
from gateway.web.http.accept import BadAcceptError, MediaRange, parse_accept
from gateway.web.http.multipart import closing, part_head
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import DICOM_JSON, entity_tag, error, over_budget
from gateway.web.middleware.manifest_scope import scoped_instances
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.store import Store

# Binary values (OB, OW, UN, ...) longer than this are sent as BulkDataURI (Annex F.2.6).
BULK_DATA_THRESHOLD = 1024
# Instances whose JSON one decode worker computes at a time.
_BATCH = 16
DICOM_XML = "application/dicom+xml"
# Stands for the /dicom-web root URL in cached JSON.
_BASE_TOKEN = "urn:passerelle:dicomweb-root:2"
# In the JSON cached before bulk data URIs named the elements inside sequences by their
# path (they named a top-level tag): such a text is computed again.
_STALE = '"urn:passerelle:dicomweb-root/'
# Bodies shorter than this are sent as they are (gzip would save little).
_GZIP_MIN_SIZE = 1024


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


class MetadataFormat(enum.Enum):
    """How metadata is sent (PS3.18 Table 10.4.4-1): DICOM JSON (Annex F), the default, or
    the Native DICOM Model (PS3.19 A.1) as multipart/related, one part per instance."""

    JSON = DICOM_JSON
    XML = DICOM_XML


# What a response holds per character of the cached JSON texts, once loaded: as JSON, the
# texts, joined, with the URLs replaced, encoded, and the gzip of that; as XML, the texts,
# the parts written from them (about three times as long), encoded, joined, and the gzip
# of that (tracemalloc: a peak of 8.7 per character to make the body, the texts aside).
_RESPONSE_FACTORS = {MetadataFormat.JSON: 5, MetadataFormat.XML: 12}
_OFFERED = f'{DICOM_JSON} or multipart/related; type="{DICOM_XML}"'


def choose_metadata_format(ranges: list[MediaRange]) -> MetadataFormat | None:
    """The first format of the Accept ``ranges`` that metadata is offered in."""
    for media in ranges:
        if media.media_type in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return MetadataFormat.JSON
        if media.media_type in ("multipart/related", "multipart/*") and \
                media.params.get("type", DICOM_XML).lower() == DICOM_XML:
            return MetadataFormat.XML
    return None


def _missing_json(store: Store, missing: list[StoredInstance], budget: ResourceBudget,
                  held: Reservation, factor: int) -> dict[str, str]:
    """Compute and cache the JSON text of instances not cached yet, each added to the
    response's reservation ``held`` (``factor`` times its length) once made."""
    texts: dict[str, str] = {}
    for i in missing:
        text = instance_json(store.blobs.absolute(i.path), retrieve_url(
            _BASE_TOKEN, i.study_uid, i.series_uid, i.sop_uid), i.frames is not None, budget)
        held.resize(held.size + factor * len(text))
        texts[i.sop_uid] = text
    store.index.cache_metadata(list(texts.items()))
    return texts


async def metadata(request: Request) -> Response:
    """GET .../metadata at study, series or instance level, as DICOM JSON or as the Native
    DICOM Model, as the Accept header asks.

    Each instance's JSON is computed once, from its header, and cached in the index with a
    placeholder for the base URL (which comes from the settings at response time); the XML
    is written from it. What the response holds is reserved before the cached texts are
    loaded, from their sizes.
    """
    store: Store = services_of(request).store
    if problem := check_uids(request):
        return problem
    try:
        chosen = choose_metadata_format(parse_accept(request.headers.get("accept")))
    except BadAcceptError as exc:
        return error(400, str(exc))
    if chosen is None:
        return error(406, f"metadata is available as {_OFFERED}")
    factor = _RESPONSE_FACTORS[chosen]
    target = target_of(request)
    scope = (target.study, target.series, target.instance, scoped_instances(request))
    budget = services_of(request).budget
    try:
        held = await budget.decode.run(_reserve_cached, store, scope, budget, factor)
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
                                                missing[start:start + _BATCH], budget, held,
                                                factor)
        texts = [computed.get(instance.sop_uid) or text or "" for instance, text in rows]
        make = _json_body if chosen is MetadataFormat.JSON else _xml_body
        body, content_type = await budget.decode.run(make, texts,
                                                     services_of(request).dicomweb_root)
        response = _response(request, body, content_type, [i for i, _ in rows])
    except OverBudget as refusal:
        held.release()
        return over_budget(refusal)
    except BaseException:
        held.release()
        raise
    response.background = BackgroundTask(held.release)
    return response


def _reserve_cached(store: Store, scope: tuple[str | None, str | None, str | None,
                                               frozenset[str] | None],
                    budget: ResourceBudget, factor: int) -> Reservation:
    study, series, instance, within = scope
    size = store.index.cached_metadata_size(study or "", series, instance, within)
    return budget.memory.reserve(factor * size, "this metadata response")


def _json_body(texts: list[str], base: str) -> tuple[bytes, str]:
    """The JSON array of ``texts`` with ``base`` for the root URL."""
    body = ("[" + ",".join(texts) + "]").replace(f'"{_BASE_TOKEN}/', f'"{base}/')
    return body.encode(), DICOM_JSON


def _xml_body(texts: list[str], base: str) -> tuple[bytes, str]:
    """A multipart/related body of one NativeDicomModel part per text, ``base`` for the root
    URL. Its boundary is a digest of the parts, so that the same metadata is the same
    bytes (its ETag is strong) and the boundary is in none of them."""

    def bulk_uri(uri: str) -> str:
        return base + uri[len(_BASE_TOKEN):] if uri.startswith(_BASE_TOKEN + "/") else uri

    parts = [native_xml(text, bulk_uri).encode() for text in texts]
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part)
    boundary = digest.hexdigest()
    part_type = f"{DICOM_XML}; charset=utf-8"
    body = b"".join(part_head(boundary, part_type, len(part), index == 0) + part
                    for index, part in enumerate(parts)) + closing(boundary)
    return body, f'multipart/related; type="{DICOM_XML}"; boundary={boundary}'


def _response(request: Request, body: bytes, content_type: str,
              instances: list[StoredInstance]) -> Response:
    """``body`` with its validators (304 when the client's copy is current, RFC 9110 13.2.2),
    gzip-compressed when the client accepts it and it is worth it."""
    etag = entity_tag(body)
    if unchanged := conditional(request, instances, etag):
        return unchanged
    headers = {"Vary": "Accept, Accept-Encoding", **validator_headers(instances, etag)}
    if "gzip" in request.headers.get("accept-encoding", "") and len(body) > _GZIP_MIN_SIZE:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(body, headers={"Content-Type": content_type, **headers})
