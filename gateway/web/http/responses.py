"""Response helpers shared by the DICOMweb endpoints."""

import gzip
import hashlib
import json

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.imaging.budget import OverBudget
from gateway.web.http.errors import text_error

DICOM_JSON = "application/dicom+json"
_GZIP_MIN_SIZE = 1024


def error(status: int, message: str) -> Response:
    """A DICOMweb error the client can read (``gateway.web.http.errors``)."""
    return text_error(status, message)


def over_budget(refusal: OverBudget) -> Response:
    """The refusal of the resource budget: its status and reason, and ``Retry-After``
    when waiting may help (RFC 9110 10.2.3)."""
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None
    return text_error(refusal.status, refusal.message, headers)


def json_response(request: Request, payload: object) -> Response:
    """DICOM JSON of ``payload``, see ``json_bytes_response``."""
    return json_bytes_response(request, json_bytes(payload))


def json_bytes(payload: object) -> bytes:
    """``payload`` as compact UTF-8 JSON: orjson's (several times faster than json's, the
    bulk of a QIDO-RS answer's time), or json's for an integer past 64 bits, which orjson
    refuses and an IS value may hold."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def entity_tag(*parts: object) -> str:
    """A strong ETag (RFC 9110 8.8.3) for a representation identified by ``parts``."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return f'"{digest.hexdigest()}"'


def not_modified(request: Request, etag: str) -> Response | None:
    """304 when the client's If-None-Match already names ``etag`` (RFC 9110 13.1.2)."""
    wanted = request.headers.get("if-none-match", "")
    if wanted.strip() == "*" or etag in (tag.strip() for tag in wanted.split(",")):
        return Response(status_code=304, headers={"ETag": etag})
    return None


def json_bytes_response(request: Request, body: bytes) -> Response:
    """DICOM JSON already encoded, with an ETag (304 on a matching If-None-Match),
    gzip-compressed when the client accepts it and it is worth it. (Not starlette's
    GZipMiddleware: it would also compress DICOM streams.)"""
    etag = entity_tag(body)
    if unchanged := not_modified(request, etag):
        return unchanged
    headers = {"Vary": "Accept-Encoding", "ETag": etag}
    if "gzip" in request.headers.get("accept-encoding", "") and len(body) > _GZIP_MIN_SIZE:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=DICOM_JSON, headers=headers)
