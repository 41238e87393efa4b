"""Validators of WADO-RS answers (RFC 9110 8.8, 13): ``Last-Modified``, the time the newest
instance served was received (a replaced instance counts from its replacement), and the
conditional requests that answer 304 Not Modified."""

import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from starlette.requests import Request
from starlette.responses import Response

from gateway.web.http.responses import not_modified
from storage.index import StoredInstance

# A Last-Modified is sent, and If-Modified-Since evaluated, only once every reception of the
# second it names is this old: a date of one second cannot tell apart two receptions of that
# second (RFC 9110 8.8.2.2), one made before and one after the answer, nor a reception
# stamped before the answer and committed after it.
_SETTLED_SECONDS = 1.0
# What a WADO-RS answer varies with (RFC 9110 12.5.5): the media type and transfer syntax
# asked for, and the manifest scoping the request (gateway.web.middleware.manifest_scope),
# which narrows what a study or series holds.
VARY = "Accept, KOS-SOPInstanceUID"
# Stored, but checked with the server before each use (RFC 9111 5.2.2.4), by this client
# only (5.2.2.7): without it, a cache may serve a copy for a tenth of its Last-Modified age
# (4.2.2), past the replacement of an instance or the withdrawal of a manifest.
CACHE_CONTROL = "private, no-cache"


def newest_reception(instances: Sequence[StoredInstance]) -> float:
    """When the newest of ``instances`` was received (seconds since the epoch)."""
    return max(instance.received_at for instance in instances)


def http_date(seconds: int) -> str:
    """An IMF-fixdate (RFC 9110 5.6.7)."""
    return format_datetime(datetime.fromtimestamp(seconds, UTC), usegmt=True)


def last_modified(instances: Sequence[StoredInstance]) -> int | None:
    """The second the newest of ``instances`` was received, None while that second is not
    settled (``_SETTLED_SECONDS`` past its end)."""
    second = math.floor(newest_reception(instances))
    return second if time.time() >= second + 1 + _SETTLED_SECONDS else None


def validator_headers(instances: Sequence[StoredInstance], etag: str | None = None,
                      vary: str = VARY) -> dict[str, str]:
    """The caching headers of a representation of ``instances``, in its 200 and its 304
    alike (RFC 9110 15.4.5): ``Cache-Control``, ``Vary``, ``Last-Modified`` (once settled),
    and its ``ETag`` if any."""
    headers = {"Cache-Control": CACHE_CONTROL, "Vary": vary}
    if etag is not None:
        headers["ETag"] = etag
    if (second := last_modified(instances)) is not None:
        headers["Last-Modified"] = http_date(second)
    return headers


def _unmodified_since(header: str, instances: Sequence[StoredInstance]) -> bool:
    """Whether If-Modified-Since ``header`` names a second from which nothing served was
    received; False for what is not an HTTP-date (ignored, RFC 9110 13.1.3)."""
    try:
        since = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return False
    if since.tzinfo is None:  # the obsolete asctime format, which has no zone: GMT
        since = since.replace(tzinfo=UTC)
    second = last_modified(instances)
    return second is not None and second <= since.timestamp()


def conditional(request: Request, instances: Sequence[StoredInstance],
                etag: str | None = None, vary: str = VARY) -> Response | None:
    """304 Not Modified when the client's copy of the representation of ``instances`` is
    current, in the order of RFC 9110 13.2.2: If-None-Match against ``etag`` when sent
    (``*`` matches any: the resource exists once this is asked, 13.1.2), else
    If-Modified-Since against the receptions; None when the answer is to be sent."""
    headers = validator_headers(instances, etag, vary)
    if "if-none-match" in request.headers:
        if request.headers["if-none-match"].strip() != "*" and \
                (etag is None or not_modified(request, etag) is None):
            return None
        return Response(status_code=304, headers=headers)
    since = request.headers.get("if-modified-since")
    if since is not None and _unmodified_since(since, instances):
        return Response(status_code=304, headers=headers)
    return None
