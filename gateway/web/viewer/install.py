"""Installing the OHIF viewer from the npm package ``@ohif/app`` (its prebuilt ``dist``).

The package is built to be served at ``/``: its ``index.html``, its style sheet and its web
manifest name files with absolute paths, and its bundles load their chunks from a public
path compiled in as ``"/"``. Installing copies ``dist`` and moves all of them to
:data:`BASE` (``/viewer/``), as OHIF's own build does when given ``PUBLIC_URL``. It drops
the files a gateway must not serve: the service worker (it would pull Workbox from a CDN),
OHIF's own sign-in pages (one loads a script from a CDN), the demo deployments' redirect
files and customization catalog, and the default ``app-config.js`` (the gateway writes its
own). It keeps a gzip copy of each text or WebAssembly file beside it, for browsers that
accept one. The tarball is checked against the npm integrity string first, and read within
budgets (members, bytes).
"""

import base64
import gzip
import hashlib
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

BASE = "/viewer/"
VERSION_FILE = "VERSION"  # in the installed folder: the package's version
_MAX_MEMBERS = 5000
_MAX_BYTES = 1 << 30  # unpacked
_MAX_MANIFEST = 1 << 20  # package.json
_DROPPED = {"sw.js", "init-service-worker.js", "_redirects", "_headers", "serve.json",
            "app-config.js",
            # OHIF's own sign-in (this gateway signs users in) and Google Cloud helper; its
            # silent-refresh page loads a script from a CDN.
            "silent-refresh.html", "oidc-client.min.js", "google.js"}
_DROPPED_FOLDERS = ("customizations/",)  # the demo catalog of ?customization= (off here)
_COMPRESSED = (".js", ".css", ".wasm", ".json", ".html", ".svg", ".map")
_PUBLIC_PATH = '__webpack_require__.p = "/";'


class ViewerPackageError(Exception):
    """The tarball is not the expected ``@ohif/app`` package."""


def verify_integrity(tarball: Path, integrity: str) -> None:
    """Raise unless ``tarball`` matches the npm ``integrity`` string (``sha512-<base64>``)."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512" or not expected:
        raise ViewerPackageError(f"unsupported integrity {integrity!r}: expected sha512-...")
    digest = hashlib.sha512()
    with tarball.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    if base64.b64encode(digest.digest()).decode() != expected:
        raise ViewerPackageError(f"{tarball}: its sha512 is not the pinned one ({integrity})")


def install_viewer(tarball: Path, target: Path) -> str:
    """Install the viewer of ``tarball`` into ``target`` (replacing what is there); return
    its version. The new folder is complete before it takes the old one's place."""
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        version = _unpack(tarball, staging)
        _rebase(staging)
        _compress(staging)
        (staging / VERSION_FILE).write_text(version + "\n")
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version


def _unpack(tarball: Path, staging: Path) -> str:
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            members, version = _members(tarball, archive)
            # The "data" filter refuses absolute paths, "..", links and devices.
            archive.extractall(staging, members=members, filter="data")
        # npm packs every file with one fixed time: dated now, a file's ETag (its time and
        # size) changes when a new version replaces it.
        now = time.time()
        for path in staging.rglob("*"):
            os.utime(path, (now, now))
    except tarfile.TarError as exc:
        raise ViewerPackageError(f"{tarball}: {exc}") from exc
    return version


def _members(tarball: Path, archive: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], str]:
    """The files of ``dist`` to install, named relative to it, and the package's version."""
    members, total, version = [], 0, ""
    for count, member in enumerate(archive):
        if count >= _MAX_MEMBERS:
            raise ViewerPackageError(f"{tarball}: more than {_MAX_MEMBERS} files")
        total += max(member.size, 0)
        if total > _MAX_BYTES:
            raise ViewerPackageError(f"{tarball}: more than {_MAX_BYTES} bytes unpacked")
        if member.name == "package/package.json" and member.isfile() \
                and member.size < _MAX_MANIFEST:
            try:
                manifest = json.load(archive.extractfile(member))  # type: ignore[arg-type]
            except ValueError as exc:
                raise ViewerPackageError(f"{tarball}: package.json: {exc}") from exc
            if not isinstance(manifest, dict) or manifest.get("name") != "@ohif/app":
                raise ViewerPackageError(f"{tarball}: not the @ohif/app package")
            version = str(manifest.get("version", ""))
        elif member.name.startswith("package/dist/") and member.isfile() \
                and Path(member.name).name not in _DROPPED \
                and not member.name.removeprefix("package/dist/").startswith(_DROPPED_FOLDERS):
            member.name = member.name.removeprefix("package/dist/")
            members.append(member)
    if not version or not any(member.name == "index.html" for member in members):
        raise ViewerPackageError(f"{tarball}: no package.json version or dist/index.html")
    return members, version


def _rebase(folder: Path) -> None:
    index = folder / "index.html"
    html = index.read_text()
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{BASE}"')
    html = html.replace('<script rel="preload" as="script" type="module" '
                        'src="/init-service-worker.js"></script>', "")
    for attribute in ("href", "src", "content"):
        html = html.replace(f'{attribute}="/', f'{attribute}="{BASE}')
    index.write_text(html)
    for style in folder.glob("*.css"):
        style.write_text(style.read_text().replace("url(/", f"url({BASE}"))
    manifest = folder / "manifest.json"
    if manifest.is_file():
        manifest.write_text(manifest.read_text().replace('"/', f'"{BASE}'))
    for bundle in folder.glob("*.js"):
        text = bundle.read_text(errors="surrogateescape")
        if _PUBLIC_PATH in text:
            bundle.write_text(text.replace(_PUBLIC_PATH, f'__webpack_require__.p = "{BASE}";'),
                              errors="surrogateescape")


def _compress(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.suffix in _COMPRESSED and path.is_file() and path.stat().st_size > 1024:
            with path.open("rb") as source, gzip.open(f"{path}.gz", "wb", 6) as copy:
                shutil.copyfileobj(source, copy, 1 << 20)
            os.utime(f"{path}.gz", ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
