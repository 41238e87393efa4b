"""What a request asks for, parsed once, before any access decision: the operation, the
study, series and instance it names (from the path, or from the WADO-URI query), and its
query parameters. The authentication, the manifest scope, the audit and the handlers all read
this one ``RequestTarget`` (``target_of``), so that none can check one thing while another
serves something else.

The route is found by the application's own routes (``starlette.routing``), so the path
parameters are the ones the handler receives, and the methods a route serves are known
before anything runs: HEAD is a GET (starlette answers it with the GET handler) and is
checked as one; any other method is refused. A single-valued parameter given twice is
refused, never read as its first or last value. The audit trail also names the study a
search's ``StudyInstanceUID`` matching key names (``audited_study``), which no access decision
reads.
"""

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import Scope

from gateway.urls import DICOMWEB_PATH
from storage.uids import is_valid_uid

WADO_URI_PATH = "/wado"
_MANIFEST_HEADER = b"kos-sopinstanceuid"
_STATE_KEY = "passerelle.target"
_SEARCHES = ("studies", "series", "instances")  # QIDO-RS resources (PS3.18 10.6)
_ACCESSES = ("metadata", "rendered", "thumbnail", "frames", "bulkdata")
# The one QIDO-RS parameter that may be repeated (PS3.18 Table 8.3.4-1: includefield 0-n;
# limit, offset, fuzzymatching 0-1; a matching key once). Every other DICOMweb parameter
# (PS3.18 8.3.3, 8.3.5), and every WADO-URI parameter (PS3.18 9: a list, where one is
# allowed, is comma-separated inside the one value), is single-valued.
_REPEATABLE = {"includefield"}
_STUDY_KEYS = ("STUDYINSTANCEUID", "0020000D")  # the matching key, by keyword or tag (upper)
_STUDY_LISTING = "/admin/studies"  # the admin API's search of studies


class Operation(enum.Enum):
    """What a request does, as the audit trail and the access rules tell requests apart."""

    SEARCH = "search"  # QIDO-RS
    TRANSFER = "transfer"  # WADO-RS instances, WADO-URI: copies of objects leave
    ACCESS = "access"  # WADO-RS metadata, rendered, thumbnail, frames, bulk data
    STORE = "store"  # STOW-RS
    ADMIN = "admin"  # the operator API
    OTHER = "other"  # health, metrics, or a path outside these APIs

    @property
    def reads_studies(self) -> bool:
        """Whether it reads stored studies, their objects or their index (what a manifest
        scopes)."""
        return self in (Operation.SEARCH, Operation.TRANSFER, Operation.ACCESS)


@dataclass(frozen=True)
class RequestTarget:
    """One request as the access decisions and the handler see it."""

    method: str  # as sent; HEAD is served (and checked) as GET
    operation: Operation
    route: str  # the route's path template, "" when no route matches the path
    methods: frozenset[str]  # the methods some route of this path serves
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    query: tuple[tuple[str, str], ...] = ()
    manifest: str = ""  # the KOS-SOPInstanceUID header: the manifest scoping the request
    problem: str = ""  # why the request cannot be served as asked (HTTP 400); "" if none

    @property
    def method_allowed(self) -> bool:
        """Whether a route of this path serves this method (always, when none matches)."""
        return not self.route or self.method in self.methods

    @property
    def audited_study(self) -> str | None:
        """The study the audit trail names (and counts the access to): the one the path
        names, else, for a search or the admin study listing, the one its
        ``StudyInstanceUID`` matching key names. Only the audit reads it: the access
        decisions and the handlers go by ``study``, which a query never sets."""
        if self.study is not None:
            return self.study
        if self.operation is Operation.SEARCH or self.route == _STUDY_LISTING:
            return _matched_study(self.query)
        return None

    @property
    def level(self) -> str:
        """The level named: study, series or instance ("" when no study is named)."""
        if self.study is None:
            return ""
        return "instance" if self.instance else "series" if self.series else "study"

    def param(self, name: str, default: str = "") -> str:
        """The value of a query parameter, ``default`` when absent (single-valued: checked
        at parsing)."""
        return next((value for key, value in self.query if key == name), default)


def _matched_study(query: Iterable[tuple[str, str]]) -> str | None:
    """The one study a ``StudyInstanceUID`` (or ``0020000D``) matching key, given once,
    names: an exact valid UID. A wildcard (``*``, ``?``) names none; so does a list (comma
    or backslash separated), which UID list matching (PS3.4 C.2.2.2.2) reads as several
    UIDs: naming only one of them would say the others were not read."""
    values = [value for key, value in query if key.upper() in _STUDY_KEYS]
    return values[0] if len(values) == 1 and is_valid_uid(values[0]) else None


def find_target(scope: Scope) -> RequestTarget | None:
    """The target parsed for a request, None before ``RequestTargetMiddleware``."""
    return scope.get("state", {}).get(_STATE_KEY)


def target_of(connection: HTTPConnection | Scope) -> RequestTarget:
    """The target parsed for a request that has gone through ``RequestTargetMiddleware``."""
    target = find_target(connection.scope if isinstance(connection, HTTPConnection)
                         else connection)
    if target is None:
        raise LookupError("the request has no parsed target: RequestTargetMiddleware missing")
    return target


def store_target(scope: Scope, target: RequestTarget) -> None:
    """Keep ``target`` in the request's ASGI scope, for everything after."""
    scope.setdefault("state", {})[_STATE_KEY] = target


def _resolve(routes: Sequence[BaseRoute], scope: Scope, prefix: str = ""
             ) -> tuple[str, dict[str, str], frozenset[str]]:
    """(template, path parameters, methods) of the route starlette dispatches ``scope`` to,
    chosen as ``Router.app`` chooses it (the first full match, else the first match of the
    path only); the methods are those of every route of that template."""
    full = partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            full = (route, child)
            break
        if match is Match.PARTIAL and partial is None:
            partial = (route, child)
    chosen = full or partial
    if chosen is None:
        return "", {}, frozenset()
    route, child = chosen
    if isinstance(route, Mount):
        return _resolve(route.routes, {**scope, **child}, prefix + route.path)
    assert isinstance(route, Route), route  # the application has routes and mounts only
    methods = frozenset().union(*(other.methods or () for other in routes
                                  if isinstance(other, Route) and other.path == route.path))
    return (prefix + route.path, {k: str(v) for k, v in child["path_params"].items()},
            methods)


def _operation(template: str, method: str) -> Operation:
    if template.startswith(("/admin", "/ui/")):  # the operator API and its console
        return Operation.ADMIN
    if template == WADO_URI_PATH:
        return Operation.TRANSFER
    if not template.startswith(DICOMWEB_PATH + "/"):
        return Operation.OTHER
    if method == "POST":
        return Operation.STORE
    segments = template.split("/")
    if segments[-1] in _SEARCHES:
        return Operation.SEARCH
    if any(segment in _ACCESSES for segment in segments):
        return Operation.ACCESS
    return Operation.TRANSFER


def _repeated(query: Iterable[tuple[str, str]], repeatable: set[str]) -> list[str]:
    seen: set[str] = set()
    repeated = []
    for name, _ in query:
        if name in seen and name not in repeatable and name not in repeated:
            repeated.append(name)
        seen.add(name)
    return repeated


def parse_target(scope: Scope, routes: Sequence[BaseRoute]) -> RequestTarget:
    """The target of an HTTP request, for the application made of ``routes``."""
    method = scope["method"]
    template, path_params, methods = _resolve(routes, {**scope, "path_params": {}})
    # A path no route serves is still classed by where it points (audit, manifest scope).
    operation = _operation(template or scope["path"], method)
    query = tuple(parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                            keep_blank_values=True))
    if operation is Operation.OTHER:  # health, metrics: no parameters that matter
        return RequestTarget(method, operation, template, methods)
    repeated = _repeated(query, _REPEATABLE if operation is Operation.SEARCH else set())
    problem = (f"parameter {', '.join(name[:64] for name in repeated[:5])} given more than"
               " once; it takes one value" if repeated else "")
    manifests = [value.decode("latin-1").strip() for name, value in scope["headers"]
                 if name == _MANIFEST_HEADER]
    if len(manifests) > 1:
        problem = problem or "header KOS-SOPInstanceUID given more than once"
    if template == WADO_URI_PATH:
        uids = [None if problem else dict(query).get(name) or None
                for name in ("studyUID", "seriesUID", "objectUID")]
    else:
        uids = [path_params.get(name) for name in ("study", "series", "instance")]
    return RequestTarget(method, operation, template, methods, *uids, query=query,
                         manifest=manifests[0] if len(manifests) == 1 else "", problem=problem)
