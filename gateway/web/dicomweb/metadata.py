"""WADO-RS metadata (PS3.18 10.4.1.1.2) of stored instances: DICOM JSON (PS3.18 Annex F) or
the Native DICOM Model (PS3.19 A.1)."""

import enum
import gzip
import hashlib
import json
import logging
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.imaging.budget import OverBudget, Reservation, ResourceBudget
from gateway.urls import ItemStep, bulkdata_url, retrieve_url
from gateway.web.dicomweb.bulkdata import PIXEL_DATA
from gateway.web.dicomweb.native_xml import native_xml
from gateway.web.dicomweb.stored_files import ensure_local
from gateway.web.dicomweb.validators import VARY, conditional, validator_headers
from gateway.web.dicomweb.wado import check_uids
from gateway.web.http.accept import BadAcceptError, MediaRange, parse_accept
from gateway.web.http.multipart import closing, part_head
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import DICOM_JSON, entity_tag, error, over_budget
from gateway.web.middleware.manifest_scope import scoped_instances
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.store import Store

log = logging.getLogger(__name__)

# Binary values (OB, OW, UN, ...) longer than this are sent as BulkDataURI (Annex F.2.6).
BULK_DATA_THRESHOLD = 1024
# Instances whose JSON one decode worker computes at a time.
_BATCH = 16
DICOM_XML = "application/dicom+xml"
# Stands for the /dicom-web root URL in cached JSON.
_BASE_TOKEN = "urn:passerelle:dicomweb-root:2"
_BULK_URI_KEY = '"BulkDataURI":"'
# In the JSON cached before bulk data URIs named the elements inside sequences by their
# path (they named a top-level tag): such a text is computed again. Anchored on the key, so
# that a value holding the old placeholder does not make its text stale forever.
_STALE = _BULK_URI_KEY + "urn:passerelle:dicomweb-root/"
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
        return strict_json(json.dumps(body, ensure_ascii=False, separators=(",", ":")))


class MetadataFormat(enum.Enum):
    """How metadata is sent (PS3.18 Table 10.4.4-1): DICOM JSON (Annex F), the default, or
    the Native DICOM Model (PS3.19 A.1) as multipart/related, one part per instance."""

    JSON = DICOM_JSON
    XML = DICOM_XML


# What a JSON response holds per character of the cached texts, once loaded: the texts,
# joined, with the URLs replaced, encoded, and the gzip of that.
_JSON_FACTOR = 5
# What the cached texts of an XML response hold while it is sent, per character, until
# measured once loaded (sys.getsizeof): a str takes up to 4 bytes a character.
_TEXT_FACTOR = 4
# What making one XML part holds at its peak (tracemalloc, measured on long texts and on
# many tiny values, tests/test_wado_rs_native_xml.py), with a margin: per character of its
# JSON text, per character the XML escapes (a reference up to 5 long), and per value, item
# or name component (its parsed object and its XML strings, however few characters it takes
# in JSON; a private element's with its creator, at most 64 characters); all times the
# bytes a character of the text takes in a str (1, 2 or 4).
_XML_CHAR_COST = 4
_XML_ESCAPED_COST = 16
_XML_VALUE_COST = 320
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
    is written from it, one part at a time as it is sent. What the response holds is
    reserved before the cached texts are loaded, from their sizes.
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
    factor = _JSON_FACTOR if chosen is MetadataFormat.JSON else _TEXT_FACTOR
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
        # Cached texts need no file; one to compute does, given back by a PACS if gone.
        if await ensure_local(request, missing):
            rows = await run_in_threadpool(store.index.instances_with_metadata, *scope)
            missing = [instance for instance, text in rows if text is None or _STALE in text]
        computed: dict[str, str] = {}
        # In batches, so that a large study does not hold a decode worker for long.
        for start in range(0, len(missing), _BATCH):
            computed |= await budget.decode.run(_missing_json, store,
                                                missing[start:start + _BATCH], budget, held,
                                                factor)
        texts = [computed.get(instance.sop_uid) or text or "" for instance, text in rows]
        instances = [i for i, _ in rows]
        base = services_of(request).dicomweb_root
        if chosen is MetadataFormat.JSON:
            body = await budget.decode.run(_json_body, texts, base)
            response = _json_response(request, body, instances)
        else:
            # What the texts take, now they are loaded (growing may wait: not on the loop).
            await budget.decode.run(held.resize, sum(sys.getsizeof(text) for text in texts))
            response = await _xml_response(request, texts, base, instances, held)
    except OverBudget as refusal:
        held.release()
        return over_budget(refusal)
    except BaseException:
        held.release()
        raise
    if response.status_code == 304:
        held.release()
    else:  # (an XML stream also gives it back as soon as it ends)
        response.background = BackgroundTask(held.release)
    return response


def _reserve_cached(store: Store, scope: tuple[str | None, str | None, str | None,
                                               frozenset[str] | None],
                    budget: ResourceBudget, factor: int) -> Reservation:
    study, series, instance, within = scope
    size = store.index.cached_metadata_size(study or "", series, instance, within)
    return budget.memory.reserve(factor * size, "this metadata response")


def _with_base(text: str, base: str) -> str:
    """``text`` with ``base`` for the root URL in its bulk data URIs: only there, never in a
    value that happens to hold the placeholder (inside a JSON string, the quotes around a
    key are escaped, so this sequence cannot be part of one)."""
    return text.replace(_BULK_URI_KEY + _BASE_TOKEN + "/", _BULK_URI_KEY + base + "/")


def strict_json(text: str) -> str:
    """``text`` with NaN, Infinity and -Infinity (which json.dumps writes for a non-finite
    FD, FL or DS, and which are not JSON, RFC 8259 6) as the strings "NaN", "Infinity" and
    "-Infinity", as dcm4che writes them; other texts as they are."""
    if "NaN" not in text and "Infinity" not in text:
        return text
    return json.dumps(json.loads(text, parse_constant=str), ensure_ascii=False,
                      separators=(",", ":"))


def _json_body(texts: list[str], base: str) -> bytes:
    """The JSON array of ``texts`` with ``base`` for the root URL."""
    return _with_base("[" + ",".join(strict_json(text) for text in texts) + "]", base).encode()


def _json_response(request: Request, body: bytes, instances: list[StoredInstance]) -> Response:
    """``body`` with its validators (304 when the client's copy is current, RFC 9110 13.2.2),
    gzip-compressed when the client accepts it and it is worth it."""
    etag = entity_tag(body)
    vary = f"{VARY}, Accept-Encoding"
    if unchanged := conditional(request, instances, etag, vary):
        return unchanged
    headers = validator_headers(instances, etag, vary)
    if "gzip" in request.headers.get("accept-encoding", "") and len(body) > _GZIP_MIN_SIZE:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(body, headers={"Content-Type": DICOM_JSON, **headers})


def xml_part_cost(text: str) -> int:
    """Bytes making the XML part of the JSON ``text`` holds at its peak: an upper bound
    from its length, the width of its characters, the characters the XML escapes, and how
    many values, items and name components it may have (each follows one of ``,[{^``)."""
    widest = ord(max(text, default=" "))
    width = 1 if widest < 0x100 else 2 if widest < 0x10000 else 4
    escaped = text.count("&") + text.count("<") + text.count(">") + text.count("\\r")
    values = text.count(",") + text.count("[") + text.count("{") + text.count("^")
    return width * (_XML_CHAR_COST * len(text) + _XML_ESCAPED_COST * escaped +
                    _XML_VALUE_COST * (values + 1))


def xml_part(text: str, base: str, budget: ResourceBudget) -> tuple[bytes, Reservation]:
    """The NativeDicomModel document of the JSON ``text``, ``base`` for the root URL, and
    the reservation that holds it until sent (made under ``xml_part_cost``)."""

    def bulk_uri(uri: str) -> str:
        return base + uri[len(_BASE_TOKEN):] if uri.startswith(_BASE_TOKEN + "/") else uri

    held = budget.memory.reserve(xml_part_cost(text), "the XML metadata of an instance")
    try:
        part = native_xml(text, bulk_uri).encode()
        held.resize(len(part))
        return part, held
    except BaseException:
        held.release()
        raise


async def _xml_response(request: Request, texts: list[str], base: str,
                        instances: list[StoredInstance], held: Reservation) -> Response:
    """A multipart/related body of one NativeDicomModel part per text, ``base`` for the root
    URL, each part made as the previous one is sent; ``held`` (the texts) until the end.
    Its ETag and boundary are a digest of the texts and ``base`` (all the body depends on),
    so that the same metadata is the same bytes and the boundary is in none of them."""
    compress = "gzip" in request.headers.get("accept-encoding", "")
    digest = hashlib.blake2b(digest_size=16)
    for text in (base, *texts):
        digest.update(text.encode())
        digest.update(b"\0")
    boundary = digest.hexdigest()
    # Each content coding its own strong ETag (RFC 9110 8.8.3.3).
    etag = f'"{boundary}{"-gzip" if compress else ""}"'
    vary = f"{VARY}, Accept-Encoding"
    if unchanged := conditional(request, instances, etag, vary):
        return unchanged
    budget: ResourceBudget = services_of(request).budget
    first = await budget.decode.run(xml_part, texts[0], base, budget)
    part_type = f"{DICOM_XML}; charset=utf-8"

    async def parts() -> AsyncIterator[bytes]:
        part, part_held = first
        try:
            for index, text in enumerate(texts):
                if index:
                    try:
                        part, part_held = await budget.decode.run(xml_part, text, base, budget)
                    except OverBudget as refusal:  # the status is sent: end unclosed
                        log.warning("XML metadata stream cut at part %d: %s", index + 1,
                                    refusal)
                        return
                yield part_head(boundary, part_type, len(part), index == 0) + part
                del part
                part_held.release()
            yield closing(boundary)
        finally:  # also when the client leaves
            part_held.release()
            held.release()

    headers = {"Content-Type": f'multipart/related; type="{DICOM_XML}"; boundary={boundary}',
               **validator_headers(instances, etag, vary)}
    if not compress:
        return StreamingResponse(parts(), headers=headers)
    headers["Content-Encoding"] = "gzip"
    return StreamingResponse(_gzip_stream(parts()), headers=headers)


async def _gzip_stream(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` as one gzip member (RFC 1952), compressed as they come."""
    compressor = zlib.compressobj(5, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    try:
        async for chunk in chunks:
            if compressed := compressor.compress(chunk):
                yield compressed
        yield compressor.flush()
    finally:
        await chunks.aclose()
