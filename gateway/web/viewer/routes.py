"""The OHIF viewer at ``/viewer/``: the files installed by ``passerelle install-viewer`` and
an app configuration pointing OHIF at this gateway's own DICOMweb (same origin: no CORS).

OHIF is a single-page application: a path under ``/viewer/`` that names no file (its
routes, ``/viewer/viewer?StudyInstanceUIDs=...``) is answered with its ``index.html``. The
bundles have content hashes in their names and are cached for good; the rest is revalidated.
A gzip copy made at install is sent to a browser that accepts it.
"""

import base64
import hashlib
import json
import mimetypes
import re
from pathlib import Path
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.urls import DICOMWEB_PATH
from gateway.web.http.request_target import WADO_URI_PATH
from gateway.web.viewer.install import BASE, VERSION_FILE

_HASHED = re.compile(r"(^|\.)[0-9a-f]{16,}\.")  # 2493.bundle.c4af70e46357151f.js, 5130ccb….wasm
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
_IMMUTABLE = "public, max-age=31536000, immutable"
_SVG_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
# What the data source needs: the DICOMweb roots, and what this server implements
# (includefield, fuzzy matching and wildcards in QIDO-RS; WADO-RS frames in their stored
# transfer syntax; the /thumbnail resource).
_DATA_SOURCE = {
    "friendlyName": "Passerelle", "name": "passerelle",
    "qidoSupportsIncludeField": True, "supportsFuzzyMatching": True,
    "supportsWildcard": True, "supportsReject": False, "staticWado": False,
    "imageRendering": "wadors", "thumbnailRendering": "thumbnail",
    "enableStudyLazyLoad": True, "omitQuotationForMultipartRequest": True,
    "singlepart": "bulkdata,video,pdf",
    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
}
_CONFIG = {
    "routerBasename": BASE.rstrip("/"), "extensions": [], "modes": [],
    "showStudyList": True, "maxNumberOfWebWorkers": 3,
    "showWarningMessageForCrossOrigin": False, "showCPUFallbackMessage": True,
    "showLoadingIndicator": True, "strictZSpacingForVolumeViewport": True,
    "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
    "studyPrefetcher": {"enabled": True, "displaySetsCount": 2, "maxNumPrefetchRequests": 10,
                        "order": "closest"},
    "defaultDataSourceName": "passerelle",
    # OHIF says once that it is for investigational use (not a certified medical device);
    # the acknowledgement is remembered 30 days in the browser.
    "investigationalUseDialog": {"option": "configure", "days": 30},
    "customizationService": [{"ohif.tours": {"$set": []}}],  # no guided tour at each start
}


def study_link(study_uid: str) -> str:
    """The viewer's URL of a study (OHIF's ``viewer`` route)."""
    return f"{BASE}viewer?StudyInstanceUIDs={quote(study_uid, safe='')}"


def app_config(origin_expression: str = "window.location.origin") -> str:
    """The ``app-config.js`` of an OHIF reading the DICOMweb server at
    ``origin_expression`` (a JavaScript expression), under this gateway's paths."""
    source = json.dumps({"namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                         "sourceName": "passerelle", "configuration": _DATA_SOURCE})
    roots = (f"const root = {origin_expression};\n"
             f"source.configuration.qidoRoot = root + {json.dumps(DICOMWEB_PATH)};\n"
             f"source.configuration.wadoRoot = root + {json.dumps(DICOMWEB_PATH)};\n"
             f"source.configuration.wadoUriRoot = root + {json.dumps(WADO_URI_PATH)};\n")
    return (f"const source = {source};\n{roots}"
            f"window.config = {json.dumps(_CONFIG)};\n"
            "window.config.dataSources = [source];\n")


class Viewer:
    """The installed viewer in ``folder`` (nothing there: a page saying how to install it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._config = app_config().encode()
        self._index: tuple[float, bytes, str] | None = None  # (mtime, html, its CSP)

    def installed(self) -> bool:
        """Whether the viewer's files are there."""
        return (self.folder / VERSION_FILE).is_file()

    async def serve(self, request: Request) -> Response:
        """A file of the viewer, its configuration, or its index for OHIF's own routes."""
        if not self.installed():
            return HTMLResponse(
                "<!DOCTYPE html><title>Viewer not installed</title><p>The OHIF viewer is not "
                "installed: run <code>./scripts/setup.sh</code> (it fetches the pinned "
                "<code>@ohif/app</code> and runs <code>passerelle install-viewer</code>).",
                status_code=503, headers={"Retry-After": "3600"})
        try:
            response = self._response(request.path_params["path"],
                                      request.headers.get("accept-encoding", ""))
        except OSError:  # the folder changed under us (a new version being installed)
            response = Response("the viewer is being installed: try again", status_code=503,
                                media_type="text/plain", headers={"Retry-After": "5"})
        # The browser takes each file for what its type says; an SVG opened on its own runs
        # nothing. (Scripts keep no policy of their own: a worker's would replace the
        # page's, and the image decoders' workers need theirs.)
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.media_type == "image/svg+xml":
            response.headers["Content-Security-Policy"] = _SVG_POLICY
        return response

    def _response(self, name: str, accepted_encodings: str) -> Response:
        if name == "app-config.js":
            return Response(self._config, media_type="text/javascript; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})
        path = self._file(name)
        if path is None:
            if name != "index.html" and "." in name.rsplit("/", 1)[-1]:  # not a route
                return Response("no such file", status_code=404, media_type="text/plain")
            return self._index_page()
        headers = {"Cache-Control": _IMMUTABLE if _HASHED.search(path.name) else "no-cache",
                   "Vary": "Accept-Encoding"}
        media_type = _media_type(path)
        packed = path.with_name(path.name + ".gz")
        if "gzip" in accepted_encodings and packed.is_file():
            path, headers["Content-Encoding"] = packed, "gzip"
        return FileResponse(path, headers=headers, media_type=media_type,
                            stat_result=path.stat())

    def _file(self, name: str) -> Path | None:
        """The file ``name`` names inside the folder, or None (never outside it)."""
        # One page only: the package's other HTML files are no part of the viewer.
        if not name or name.endswith((".html", ".gz")) or "\0" in name:
            return None
        root = self.folder.resolve()
        path = (root / name).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None

    def _index_page(self) -> Response:
        index = self.folder / "index.html"
        mtime = index.stat().st_mtime
        if self._index is None or self._index[0] != mtime:
            html = index.read_bytes()
            self._index = (mtime, html, _policy(html.decode()))
        return Response(self._index[1], media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache",
                                 "Content-Security-Policy": self._index[2]})


def _media_type(path: Path) -> str:
    if path.suffix == ".wasm":
        return "application/wasm"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _policy(html: str) -> str:
    """The Content-Security-Policy of the viewer's page: only its own files and this origin,
    its inline scripts by their hashes; ``wasm-unsafe-eval`` for the image codecs
    (WebAssembly), ``blob:`` for the workers and images it makes."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(html))
    return ("default-src 'self'; "
            f"script-src 'self' 'wasm-unsafe-eval' {hashes}; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
            "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self' data: blob:; "
            "object-src 'none'; base-uri 'self'; frame-ancestors 'self'")


async def _to_folder(request: Request) -> Response:
    return RedirectResponse(BASE, status_code=307)


def viewer_routes(folder: Path) -> list[Route]:
    """The routes of the viewer installed in ``folder``."""
    viewer = Viewer(folder)
    return [Route(BASE.rstrip("/"), _to_folder, methods=["GET"]),
            Route(BASE + "{path:path}", viewer.serve, methods=["GET"])]
