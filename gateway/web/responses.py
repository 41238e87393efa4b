"""Response helpers shared by the DICOMweb endpoints."""

import gzip
import json

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

DICOM_JSON = "application/dicom+json"
_GZIP_MIN_SIZE = 1024


def error(status: int, message: str) -> Response:
    """A plain-text error the client can read."""
    return PlainTextResponse(message + "\n", status_code=status)


def json_response(request: Request, payload: object) -> Response:
    """DICOM JSON of ``payload``, see ``json_bytes_response``."""
    return json_bytes_response(
        request, json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


def json_bytes_response(request: Request, body: bytes) -> Response:
    """DICOM JSON already encoded, gzip-compressed when the client accepts it and it is
    worth it. (Not starlette's GZipMiddleware: it would also compress DICOM streams.)"""
    headers = {"Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", "") and len(body) > _GZIP_MIN_SIZE:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=DICOM_JSON, headers=headers)
