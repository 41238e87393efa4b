"""Operator API under ``/admin``: the stored studies, who saw each (counted from the audit
trail per user and client address) and the outbox (``GET``), and the actions that go through
the outbox like the automatic publications (``POST``): publish, withdraw or change the
confidentiality of a study, send a failed publication again.

The lists are pages: ``limit`` (default 50, at most 1000) and ``offset``, answered as
``{"total": <all matches>, "offset": ..., "limit": ..., "<items>": [...]}``. Studies are
matched as QIDO-RS matches them at the study level (PS3.18 10.6.1: ``PatientName``,
``PatientID``, ``AccessionNumber``, ``StudyDate`` ranges, ``ModalitiesInStudy``,
``fuzzymatching``...), most recent study first; publications come failed first (a person must
act on them), then newest first; who saw a study, the most recent access first.

A queued action answers 202 with what the service will do with it:
``{"publication": <row>, "registry": <registry URL or null>, "will_send": true|false}``.

``POST /admin/fetch`` (``{"study": UID}``, ``{"accession": NUMBER}`` or ``{"patient": ID,
"since": "YYYY-MM-DD"}``, optionally ``"peer": AE``) retrieves studies from the PACS peers
(gateway.pacs.fetch) synchronously, its size bounded (at most ``MAX_STUDIES`` studies,
matched before anything is retrieved): refusals come first as JSON errors (400 no PACS or a
bad query, 404 nothing matched, 502 no peer answered the C-FIND, 503 too many fetches at
once); then a 200 streams its course as ``application/x-ndjson``, one JSON event a line,
the last ``{"event": "summary", ...}``. A client that goes away does not stop it.
The same ``ROUTES`` serve the HTTP listener (behind its authentication) and the control
channel of the data dir (``gateway.control``).
"""

import json
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway import metrics
from gateway.pacs.fetch import FetchQuery, FetchRefusedError, find, retrieve
from gateway.publication.confidentiality import Confidentiality
from gateway.web import admin_retention
from gateway.web.dicomweb.qido import BadQueryError, parse_query
from gateway.web.http.errors import admin_error
from gateway.web.http.origin import foreign_origin
from gateway.web.http.request_target import target_of
from gateway.web.services import Services, services_of
from storage.numbers import INT32_MAX, INT64_MAX, NumberError, parse_int
from storage.outbox import UNFINISHED, Action, NotFailedError, Publication, State
from storage.search import Level, Match, QueryError
from storage.study_accesses import StudyAccesses
from storage.summaries import series_summaries, study_summaries

log = logging.getLogger(__name__)

_ACTIONS = {"publish": Action.PUBLISH, "unpublish": Action.UNPUBLISH,
            "confidentiality": Action.CONFIDENTIALITY}


_MAX_BODY_BYTES = 64 << 10  # a confidentiality change is a few dozen bytes


class BodyTooLargeError(ValueError):
    """A request body over the limit of this endpoint (HTTP 413)."""


async def small_body(request: Request) -> bytes:
    """The request's body, BodyTooLargeError past ``_MAX_BODY_BYTES``."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY_BYTES:
            raise BodyTooLargeError(f"request body over {_MAX_BODY_BYTES} bytes")
    return bytes(body)


def _queued(services: Services, row: Publication) -> JSONResponse:
    """202 with the row and whether this service sends it, and where."""
    services.wake_publisher()
    return JSONResponse({"publication": asdict(row), "registry": services.registry_url or None,
                         "will_send": bool(services.registry_url)}, status_code=202)


def _forged(request: Request) -> Response | None:
    """403 for an action a page of another site made the browser send (without
    authentication, or with a client certificate, nothing else tells it apart)."""
    foreign = foreign_origin(request, services_of(request).public_url)
    return admin_error(403, f"refused: {foreign}") if foreign else None


async def queue_study_action(request: Request) -> Response:
    """Queue one action; the confidentiality body is ``{"level": "R", "masking": [...]}``."""
    if forged := _forged(request):
        return forged
    action = _ACTIONS.get(request.path_params["action"])
    if action is None:
        return admin_error(404, f"unknown action {request.path_params['action']!r}: "
                           f"{', '.join(_ACTIONS)}")
    payload = ""
    if action is Action.CONFIDENTIALITY:
        try:
            body = json.loads(await small_body(request) or b"{}")
            payload = Confidentiality(str(body.get("level", "N")),
                                      tuple(body.get("masking", []))).payload()
        except BodyTooLargeError as exc:
            return admin_error(413, str(exc))
        except RecursionError:
            return admin_error(400, "JSON nested too deeply")
        except (ValueError, TypeError, AttributeError) as exc:
            return admin_error(
                400, f"expected {{\"level\": \"N|R|V\", \"masking\": [codes]}}: {exc}")
    services = services_of(request)
    try:
        row = await run_in_threadpool(services.outbox.queue, request.path_params["study"],
                                      action, payload)
    except LookupError as exc:
        return admin_error(404, str(exc))
    return _queued(services, row)


async def retry_publication(request: Request) -> Response:
    """Put a failed publication back in the queue (409 when it is not failed)."""
    if forged := _forged(request):
        return forged
    services = services_of(request)
    try:
        pk = parse_int(request.path_params["id"], "publication id", 1, INT64_MAX)
    except NumberError as exc:
        return admin_error(400, str(exc))
    try:
        retried = await run_in_threadpool(services.outbox.retry, pk)
    except NotFailedError as exc:
        return admin_error(409, str(exc))
    except LookupError as exc:
        return admin_error(404, str(exc))
    return _queued(services, retried)


# Fetches running at once in one process, each a thread waiting on a PACS.
_FETCHES = threading.BoundedSemaphore(2)
_FETCH_RETRY_SECONDS = 30


def _fetch_refused(status: int, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    log.warning("fetch refused (%d): %s", status, message)
    metrics.PACS_FETCHES.labels("refused").inc()
    return admin_error(status, message, headers)


async def fetch_studies(request: Request) -> Response:
    """Retrieve studies from the PACS peers (see the module): the refusals as errors, then
    the fetch's events as NDJSON."""
    if forged := _forged(request):
        return forged
    services = services_of(request)
    if not services.restorer.enabled:
        return _fetch_refused(400, "no PACS peer is configured (setting pacs, "
                                   "PASSERELLE_PACS): there is nothing to fetch from")
    try:
        query = FetchQuery.parse(json.loads(await small_body(request) or b"{}"))
    except BodyTooLargeError as exc:
        return _fetch_refused(413, str(exc))
    except RecursionError:
        return _fetch_refused(400, "JSON nested too deeply")
    except ValueError as exc:  # JSON errors too
        return _fetch_refused(400, f'expected {{"study": UID}}, {{"accession": NUMBER}} or '
                                   f'{{"patient": ID, "since": "YYYY-MM-DD"}}: {exc}')
    if not _FETCHES.acquire(blocking=False):
        return _fetch_refused(503, "other fetches are running: ask again later",
                              {"Retry-After": str(_FETCH_RETRY_SECONDS)})
    try:
        found = await run_in_threadpool(find, services.restorer, query)
    except FetchRefusedError as exc:
        _FETCHES.release()
        return _fetch_refused(exc.status, str(exc))
    except BaseException:
        _FETCHES.release()
        raise
    events: queue.SimpleQueue[dict[str, object] | None] = queue.SimpleQueue()

    def run() -> None:
        try:
            retrieve(services.restorer, found, events.put)
        except Exception:  # a bug: the client still gets an end
            log.exception("fetch of %s", query.describe())
            events.put({"event": "error", "error": "internal error; the service log has details"})
        finally:
            _FETCHES.release()
            events.put(None)

    threading.Thread(target=run, name="fetch", daemon=True).start()

    async def lines() -> AsyncIterator[bytes]:
        while (event := await run_in_threadpool(events.get)) is not None:
            yield json.dumps(event, ensure_ascii=False).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


_PAGE = 50  # rows of a list when the request does not say
_MAX_PAGE = 1000


def _page_of(request: Request) -> tuple[int, int]:
    """``limit`` and ``offset`` of a list request; NumberError when out of range."""
    target = target_of(request)
    limit = parse_int(target.param("limit", str(_PAGE)), "limit", 1, _MAX_PAGE)
    offset = parse_int(target.param("offset", "0"), "offset", 0, INT32_MAX)
    return limit, offset


def _paged(items: str, rows: list[dict[str, Any]], total: int, limit: int,
           offset: int) -> JSONResponse:
    return JSONResponse({"total": total, "offset": offset, "limit": limit, items: rows})


def _states(request: Request) -> tuple[State, ...]:
    """``state=failed,pending`` (default: the unfinished ones; ``all=true``: every one)."""
    target = target_of(request)
    if target.param("all").lower() in ("1", "true", "yes"):
        return tuple(State)
    names = [name for name in target.param("state").split(",") if name]
    try:
        return tuple(State(name) for name in names) or UNFINISHED
    except ValueError:
        raise ValueError(f"unknown state in {target.param('state')[:100]!r}: "
                         f"{', '.join(State)}") from None


async def list_outbox(request: Request) -> JSONResponse:
    """A page of the publications in the states asked for."""
    try:
        states, (limit, offset) = _states(request), _page_of(request)
    except ValueError as exc:  # NumberError too
        return admin_error(400, str(exc))
    rows, total = await run_in_threadpool(services_of(request).outbox.page, states, limit,
                                          offset)
    return _paged("publications", [asdict(row) for row in rows], total, limit, offset)


def study_page(services: Services, matches: list[Match], fuzzy: bool, limit: int,
               offset: int) -> tuple[list[dict[str, Any]], int]:
    """The summaries of one page of matching studies, each with its newest publication
    (null if none), and how many match in all."""
    index = services.store.index
    uids = [str(row["StudyInstanceUID"]) for row in index.search(
        Level.STUDY, matches, ["StudyInstanceUID"], fuzzy, limit, offset)]
    latest = services.outbox.latest_of(uids)
    rows = [{**asdict(summary), "publication": asdict(latest[summary.study_uid])
             if summary.study_uid in latest else None}
            for summary in study_summaries(index, uids)]
    return rows, index.count(Level.STUDY, matches, fuzzy)


async def list_studies(request: Request) -> JSONResponse:
    """A page of the stored studies matching the query, with their counts, reception
    times, size and newest publication."""
    try:
        limit, offset = _page_of(request)
        query = [(key, value) for key, value in target_of(request).query
                 if key not in ("limit", "offset")]
        matches, _, fuzzy, _, _, _ = parse_query(query, Level.STUDY, {})
        rows, total = await run_in_threadpool(study_page, services_of(request), matches,
                                              fuzzy, limit, offset)
    except (NumberError, BadQueryError, QueryError) as exc:
        return admin_error(400, str(exc))
    return _paged("studies", rows, total, limit, offset)


async def study(request: Request) -> Response:
    """One study: its summary, its series and a page of its publications (failed first)."""
    services, uid = services_of(request), request.path_params["study"]
    try:
        limit, offset = _page_of(request)
    except NumberError as exc:
        return admin_error(400, str(exc))
    found = await run_in_threadpool(study_summaries, services.store.index, [uid])
    if not found:
        return admin_error(404, f"no such study {uid}")
    series = await run_in_threadpool(series_summaries, services.store.index, uid)
    rows, total = await run_in_threadpool(services.outbox.page, tuple(State), limit, offset,
                                          uid)
    return JSONResponse({"study": asdict(found[0]), "series": [asdict(s) for s in series],
                         "publications": [asdict(r) for r in rows],
                         "publication_total": total})


async def study_access(request: Request) -> Response:
    """Who saw a study, a page: each user and client address with its count of accesses,
    how many of them were refused or failed, the first and last time and the last one's
    kind, the most recent first."""
    services, uid = services_of(request), request.path_params["study"]
    try:
        limit, offset = _page_of(request)
    except NumberError as exc:
        return admin_error(400, str(exc))
    found = await run_in_threadpool(StudyAccesses(services.store.index).page, uid, limit,
                                    offset)
    if found is None:
        return admin_error(404, f"no such study {uid}")
    rows, total = found
    return _paged("access", [asdict(row) for row in rows], total, limit, offset)


ROUTES = [
    Route("/admin/studies", list_studies, methods=["GET"]),
    Route("/admin/studies/{study}", study, methods=["GET"]),
    Route("/admin/studies/{study}/access", study_access, methods=["GET"]),
    *admin_retention.ROUTES,
    Route("/admin/studies/{study}/{action}", queue_study_action, methods=["POST"]),
    Route("/admin/outbox", list_outbox, methods=["GET"]),
    Route("/admin/outbox/{id}/retry", retry_publication, methods=["POST"]),
    Route("/admin/fetch", fetch_studies, methods=["POST"]),
]
