"""The operator console at ``/ui/``: server-rendered pages (Jinja2) over the same read API
and the same outbox as ``/admin`` and the CLI, readable without JavaScript; a few lines of
script refresh the publication and health panels in place.

- ``/ui/``: the studies, searched by patient name (accent- and case-insensitive prefix),
  Patient ID, accession number, study date range and modality, a page at a time;
- ``/ui/studies/{uid}``: a study, its series, its publication history (failed first, with
  the registry's answer as text), who saw it (from the audit trail, the 50 most recent
  users and addresses) and the actions on it, each confirmed on a page of its own;
- ``/ui/health``: the processes, the outbox, the registry as the publisher last met it and
  as a probe of this process meets it now (gateway.publication.registry_probe), the free
  disk space.
"""

import shutil
import time
from dataclasses import asdict
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from gateway.publication.confidentiality import Confidentiality
from gateway.publication.operation_outcome import outcome_issues
from gateway.security.audit import ACCESS_KINDS, ANONYMOUS
from gateway.web.admin import BodyTooLargeError, small_body, study_page
from gateway.web.console import csrf
from gateway.web.console.language import negotiate, words
from gateway.web.services import Services, services_of
from gateway.web.viewer.routes import study_link
from storage.numbers import INT64_MAX, NumberError, parse_int
from storage.outbox import Action, NotFailedError, State
from storage.search import Match, QueryError
from storage.study_accesses import StudyAccesses
from storage.summaries import series_summaries, study_summaries

_PAGE = 25
_HISTORY = 100  # publications shown on a study's page
_SEEN_BY = 50  # (user, address) rows of who saw a study shown on its page
_ACTIONS = {"publish": Action.PUBLISH, "unpublish": Action.UNPUBLISH,
            "confidentiality": Action.CONFIDENTIALITY}
_LEVELS = ("N", "R", "V")
_SEARCH_FIELDS = ("patient_name", "patient_id", "accession", "date_from", "date_to",
                  "modality")

_templates = Environment(loader=PackageLoader("gateway.web.console", "templates"),
                         autoescape=select_autoescape(["html"]), trim_blocks=True,
                         lstrip_blocks=True)


def _size(size: int) -> str:
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds)) if seconds else "—"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else \
        f"{seconds // 60} min {seconds % 60:02d} s"


def _date(study_date: str) -> str:
    return f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:8]}" if len(study_date) == 8 \
        else study_date


def may_act(request: Request) -> bool:
    """Whether the request's user may do the console's actions: anyone without
    authentication (the loopback demo mode), else who has the admin scope."""
    rights = request.app.state.rights
    return rights is None or rights.may_act(request.scope.get("user"))


def render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    """A console page: ``template`` in the request's language, with its form token, the
    user signed in and whether they may act."""
    language = negotiate(request.headers.get("accept-language", ""))
    token = csrf.token_of(request)
    user = request.scope.get("user")
    html = _templates.get_template(template).render(
        t=words(language), language=language, csrf_field=csrf.FIELD, csrf_token=token,
        size=_size, when=_when, date=_date, viewer=study_link,
        may_act=may_act(request),
        user=user and (user.label or user.name), signed_in=bool(user and user.kind == "session"),
        sign_in=request.app.state.sign_in is not None, **context)
    response = HTMLResponse(html, status_code=status, headers={
        "Cache-Control": "no-store", "Vary": "Accept-Language",
        # Its own style sheet and script only, and never inside another site's frame.
        "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
        "X-Frame-Options": "DENY"})
    csrf.keep(response, request, token)
    return response


def _matches(form: dict[str, str]) -> list[Match]:
    """QIDO matching keys of the search form; a patient name is a prefix of any of its
    components (fuzzy matching)."""
    matches = []
    if form["patient_name"]:
        matches.append(Match("PatientName", form["patient_name"].rstrip("*") + "*"))
    for field, keyword in (("patient_id", "PatientID"), ("accession", "AccessionNumber"),
                           ("modality", "ModalitiesInStudy")):
        if form[field]:
            matches.append(Match(keyword, form[field]))
    low, high = (form[f].replace("-", "") for f in ("date_from", "date_to"))
    if low or high:
        matches.append(Match("StudyDate", f"{low}-{high}"))
    return matches


async def studies(request: Request) -> Response:
    """The list of studies, searched and paged."""
    form = {field: request.query_params.get(field, "").strip()[:64] for field in _SEARCH_FIELDS}
    try:
        page = parse_int(request.query_params.get("page", "1"), "page", 1, 1 << 20)
        rows, total = await run_in_threadpool(study_page, services_of(request),
                                              _matches(form), True, _PAGE, (page - 1) * _PAGE)
        problem = ""
    except (NumberError, QueryError) as exc:
        page, rows, total, problem = 1, [], 0, str(exc)
    pages = max(1, -(-total // _PAGE))
    query = {k: v for k, v in form.items() if v}
    return render(request, "studies.html", status=400 if problem else 200, form=form,
                   studies=rows, total=total, page=page, pages=pages, problem=problem,
                   link=lambda n: "?" + urlencode({**query, "page": n}))


def _publications(services: Services, uid: str) -> list[dict[str, Any]]:
    rows, _ = services.outbox.page(tuple(State), _HISTORY, 0, uid)
    # The registry's answer as its issues, else the error recorded.
    return [{**asdict(row), "answer": [issue.text for issue in outcome_issues(row.response)]
             or ([row.last_error] if row.last_error else [])} for row in rows]


async def study(request: Request) -> Response:
    """A study's page: summary, series, publication history, actions."""
    services, uid = services_of(request), request.path_params["study"]
    found = await run_in_threadpool(study_summaries, services.store.index, [uid])
    if not found:
        return render(request, "message.html", status=404, message=("unknown_study", uid))
    series = await run_in_threadpool(series_summaries, services.store.index, uid)
    history = await run_in_threadpool(_publications, services, uid)
    # Who saw a study names staff and their addresses: for those who may act (the admin
    # scope, as /admin/studies/{uid}/access), not for every reader of the images.
    seen, seen_total = (await run_in_threadpool(
        StudyAccesses(services.store.index).page, uid, _SEEN_BY, 0) if may_act(request)
        else None) or ([], 0)
    done = request.query_params.get("done", "")
    return render(request, "study.html", study=found[0], series=series,
                   publications=history, done=done if done in (*_ACTIONS, "retry") else "",
                   registry=services.registry_url, seen=seen, seen_total=seen_total,
                   show_seen=may_act(request),
                   kinds=ACCESS_KINDS, anonymous=ANONYMOUS)


async def publications(request: Request) -> Response:
    """The publication history of a study alone, for the page to refresh in place."""
    services, uid = services_of(request), request.path_params["study"]
    history = await run_in_threadpool(_publications, services, uid)
    return render(request, "publications.html", publications=history,
                   study={"study_uid": uid})


async def confirm(request: Request) -> Response:
    """The confirmation page of an action on a stored study (a form that posts it)."""
    services, uid = services_of(request), request.path_params["study"]
    action = request.path_params["action"]
    found = await run_in_threadpool(study_summaries, services.store.index, [uid])
    if action not in (*_ACTIONS, "retry") or not found:
        return render(request, "message.html", status=404, message=("unknown_study", uid))
    return render(request, "confirm.html", study_uid=uid, study_path=quote(uid, safe=""),
                   action=action, levels=_LEVELS,
                   publication=request.query_params.get("id", "")[:20])


def refused(request: Request, why: str, status: int) -> Response:
    """A page saying the request was refused, and why."""
    return render(request, "message.html", status=status, message=("refused", why))


def refusal_page(scope: Scope, status: int, why: str) -> Response:
    """The refusal of access control, as a page (gateway.web.middleware.auth)."""
    return refused(Request(scope), why, status)


async def act(request: Request) -> Response:
    """Do a confirmed action through the outbox, then back to the study's page."""
    services, uid = services_of(request), request.path_params["study"]
    action = request.path_params["action"]
    try:
        form = dict(parse_qsl((await small_body(request)).decode("utf-8", "replace"),
                              max_num_fields=8))
    except (BodyTooLargeError, ValueError) as exc:
        return refused(request, str(exc), 400)
    forged = csrf.refusal(request, form.get(csrf.FIELD, ""), services.public_url)
    if forged:
        return refused(request, forged, 403)
    try:
        if action == "retry":
            pk = parse_int(form.get("publication", ""), "publication id", 1, INT64_MAX)
            row = await run_in_threadpool(services.outbox.get, pk)
            if row is None or row.study_uid != uid:
                return refused(request, f"no publication {pk} of this study", 404)
            await run_in_threadpool(services.outbox.retry, pk)
        elif action in _ACTIONS:
            payload = ""
            if action == "confidentiality":
                level = form.get("level", "")
                if level not in _LEVELS:
                    return refused(request, f"level must be one of {', '.join(_LEVELS)}", 400)
                payload = Confidentiality(level, ()).payload()
            await run_in_threadpool(services.outbox.queue, uid, _ACTIONS[action], payload)
        else:
            return refused(request, f"unknown action {action[:40]!r}", 404)
    except (NumberError, NotFailedError, LookupError) as exc:
        return refused(request, str(exc), 409 if isinstance(exc, NotFailedError) else 400)
    services.wake_publisher()
    return RedirectResponse(f"/ui/studies/{quote(uid, safe='')}?done={action}",
                            status_code=303)


def _health(services: Services) -> dict[str, Any]:
    activity = services.outbox.activity()
    disk = shutil.disk_usage(services.store.blobs.studies_dir)
    probe = services.registry_probe
    return {"serving": services.serving(), "activity": activity, "now": time.time(),
            "disk_free": disk.free, "disk_total": disk.total,
            "registry": services.registry_url, "probe": probe.check() if probe else None}


async def health(request: Request) -> Response:
    """The health page (``?panel=1``: its panel alone, for the page to refresh in place)."""
    state = await run_in_threadpool(_health, services_of(request))
    template = "health_panel.html" if request.query_params.get("panel") else "health.html"
    return render(request, template, age=_age, **state)


_STATIC = {name: (files("gateway.web.console").joinpath("static", name).read_bytes(), kind)
           for name, kind in (("console.css", "text/css; charset=utf-8"),
                              ("console.js", "text/javascript; charset=utf-8"))}


async def static_file(request: Request) -> Response:
    """The console's style sheet and script (read once, at import)."""
    found = _STATIC.get(request.path_params["name"])
    if found is None:
        return Response("no such file", status_code=404, media_type="text/plain")
    return Response(found[0], media_type=found[1],
                    headers={"Cache-Control": "public, max-age=3600"})


async def home(request: Request) -> Response:
    """``/`` and ``/ui``: the console."""
    return RedirectResponse("/ui/", status_code=307)


ROUTES = [
    Route("/ui/", studies, methods=["GET"]),
    Route("/ui/studies/{study}", study, methods=["GET"]),
    Route("/ui/studies/{study}/publications", publications, methods=["GET"]),
    Route("/ui/studies/{study}/{action}", confirm, methods=["GET"]),
    Route("/ui/studies/{study}/{action}", act, methods=["POST"]),
    Route("/ui/health", health, methods=["GET"]),
    Route("/ui/static/{name}", static_file, methods=["GET"]),
]
HOME = Route("/", home, methods=["GET"])
CONSOLE_ROOT = Route("/ui", home, methods=["GET"])  # the same redirect, to /ui/
