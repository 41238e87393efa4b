"""HTTP application (starlette): DICOMweb under /dicom-web, WADO-URI, admin, the console
and its sign-in, the viewer, health and metrics."""

from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from gateway.config import AuthSettings, HttpSettings
from gateway.liveness import ROLES, unavailable
from gateway.security.client_counts import ClientCounts
from gateway.security.openid import RelyingParty
from gateway.urls import DICOMWEB_PATH
from gateway.web import admin
from gateway.web.console import pages as console
from gateway.web.console import sign_in as sign_in_pages
from gateway.web.dicomweb.bulkdata import bulkdata
from gateway.web.dicomweb.frames import frames
from gateway.web.dicomweb.metadata import metadata
from gateway.web.dicomweb.qido import search_instances, search_series, search_studies
from gateway.web.dicomweb.rendered import rendered, thumbnail
from gateway.web.dicomweb.stow import store_instances
from gateway.web.dicomweb.wado import retrieve
from gateway.web.dicomweb.wado_uri import wado_uri
from gateway.web.http.errors import http_exception, internal_error
from gateway.web.http.request_target import WADO_URI_PATH
from gateway.web.middleware.access_audit import AccessAuditMiddleware
from gateway.web.middleware.allowed_hosts import (
    LOOPBACK_NAMES,
    AllowedHostsMiddleware,
    host_name,
)
from gateway.web.middleware.auth import AuthMiddleware, Rights, TokenVerifier
from gateway.web.middleware.client_limit import ClientLimitMiddleware
from gateway.web.middleware.manifest_scope import ManifestAccess, ManifestScopeMiddleware
from gateway.web.middleware.request_target import RequestTargetMiddleware
from gateway.web.middleware.session import Sealer, Sessions
from gateway.web.services import Services
from gateway.web.viewer.routes import viewer_routes

_RENDERABLE = ("/studies/{study}", "/studies/{study}/series/{series}",
               "/studies/{study}/series/{series}/instances/{instance}",
               "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}")


def create_app(services: Services, http: HttpSettings, auth: AuthSettings,
               requests_in_progress: ClientCounts | None = None) -> Starlette:
    """The HTTP application over ``services``, with the limits of ``http`` and the access
    control of ``auth``; ``requests_in_progress`` counts each client's requests (those of
    this process alone when not given)."""

    async def health(request: Request) -> JSONResponse:
        # 200 when every role has a process serving; 503 naming the roles that have none.
        serving = services.serving()
        down = unavailable(serving)
        body = {"status": "unavailable" if down else "ok", "unavailable": down,
                **{role: bool(serving[role]) for role in ROLES}, "processes": serving}
        return JSONResponse(body, status_code=503 if down else 200)

    async def metrics(request: Request) -> Response:
        text = await run_in_threadpool(generate_latest, services.metrics)  # reads files
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    dicomweb = [
        Route("/studies", search_studies, methods=["GET"]),
        Route("/studies", store_instances, methods=["POST"]),
        Route("/series", search_series, methods=["GET"]),
        Route("/instances", search_instances, methods=["GET"]),
        Route("/studies/{study}/series", search_series, methods=["GET"]),
        Route("/studies/{study}/instances", search_instances, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances", search_instances, methods=["GET"]),
        Route("/studies/{study}", retrieve, methods=["GET"]),
        Route("/studies/{study}", store_instances, methods=["POST"]),
        Route("/studies/{study}/series/{series}", retrieve, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}", retrieve,
              methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}", frames,
              methods=["GET"]),
        *(Route(f"{level}/{resource}", handler, methods=["GET"])
          for level in _RENDERABLE for resource, handler in (("rendered", rendered),
                                                             ("thumbnail", thumbnail))),
        Route("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path:path}",
              bulkdata, methods=["GET"]),
        Route("/studies/{study}/metadata", metadata, methods=["GET"]),
        Route("/studies/{study}/series/{series}/metadata", metadata, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}/metadata", metadata,
              methods=["GET"]),
    ]
    counts = requests_in_progress or ClientCounts(http.max_requests_per_client)
    middleware = [Middleware(ClientLimitMiddleware, counts=counts),
                  Middleware(AccessAuditMiddleware, trail=services.audit)]
    if http.cors_allow_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=http.cors_allow_origins,
            # HEAD wherever GET is: every GET route serves HEAD (RequestTarget).
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=["Accept", "Authorization", "Content-Type", "If-Modified-Since",
                           "If-None-Match", "KOS-SOPInstanceUID"],
            expose_headers=["Content-Type", "Content-Length", "ETag", "Last-Modified",
                            "Warning", "WWW-Authenticate"],
            max_age=3600))
    rights = Rights(auth.read_scope, auth.write_scope, auth.admin_scope,
                    frozenset(auth.allowed_subjects), auth.metrics_require_auth,
                    auth.certificate_scopes()) if auth.enabled else None
    verifier = TokenVerifier(auth.issuer, auth.jwks_url, auth.audience,
                             auth.leeway_seconds) if auth.issuer else None
    sign_in = None
    if auth.sign_in:
        assert verifier is not None  # a client id needs an issuer (AuthSettings)
        redirect_uri = f"{services.public_url}{sign_in_pages.CALLBACK_PATH}"
        sign_in = sign_in_pages.SignIn(
            RelyingParty(auth, redirect_uri, verifier),
            Sessions(services.session_key, auth.session_max_age_seconds),
            Sealer(services.session_key, "login"))
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route(WADO_URI_PATH, wado_uri, methods=["GET"]),
        *admin.ROUTES,
        console.HOME,
        console.CONSOLE_ROOT,
        *console.ROUTES,
        *viewer_routes(http.viewer_dir),
        *(sign_in_pages.ROUTES if sign_in else ()),
        Mount(DICOMWEB_PATH, routes=dicomweb),
    ]
    if not (auth.enabled or auth.allow_unauthenticated):  # the loopback demo mode
        middleware.insert(0, Middleware(AllowedHostsMiddleware, names=[
            *LOOPBACK_NAMES, host_name(urlsplit(services.public_url).netloc),
            host_name(http.host), *http.allowed_hosts]))
    # Inside the audit (which records what it parsed, refusals included), before every
    # access decision.
    middleware.append(Middleware(RequestTargetMiddleware, routes=routes))
    if rights is not None:
        middleware.append(Middleware(AuthMiddleware, verifier=verifier, rights=rights,
                                     sessions=sign_in.sessions if sign_in else None,
                                     refusal_page=console.refusal_page))
    middleware.append(Middleware(ManifestScopeMiddleware, access=ManifestAccess(services.store),
                                 required=auth.require_kos_reference))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: http_exception, Exception: internal_error})
    app.state.services = services
    app.state.rights = rights  # None: no authentication (the console's actions are open)
    app.state.sign_in = sign_in
    return app
