"""``passerelle install-viewer``: an npm tarball of ``@ohif/app`` checked against its
integrity, unpacked within budgets and inside its folder only, moved to ``/viewer/``."""

import base64
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from gateway.web.viewer.install import ViewerPackageError, install_viewer, verify_integrity
from tests.processes import REPO

INDEX = ('<html><head><script>window.PUBLIC_URL="/"</script>'
         '<link rel="manifest" href="/manifest.json">'
         '<script rel="preload" as="script" type="module" src="/init-service-worker.js">'
         '</script><script defer src="/app.bundle.0123456789abcdef.js"></script></head>'
         '<body><div id="root"></div></body></html>')
BUNDLE = 'x();__webpack_require__.p = "/";y();' + "//" + "padding " * 200


def _tarball(path: Path, files: dict[str, bytes], name: str = "@ohif/app") -> Path:
    with tarfile.open(path, "w:gz") as archive:
        entries = {"package/package.json": json.dumps({"name": name,
                                                       "version": "9.9.9"}).encode(),
                   **files}
        for member, data in entries.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _package(path: Path, **extra: bytes) -> Path:
    return _tarball(path, {"package/dist/index.html": INDEX.encode(),
                           "package/dist/app.bundle.0123456789abcdef.js": BUNDLE.encode(),
                           "package/dist/app.bundle.css": b"a{src:url(/f.woff2)}",
                           "package/dist/manifest.json": b'{"icons":[{"src":"/assets/i.png"}]}',
                           "package/dist/sw.js": b"self.x()",
                           "package/dist/silent-refresh.html": b"<script src=https://cdn>",
                           "package/dist/customizations/index.html": b"<html>",
                           "package/dist/app-config.js": b"window.config={}",
                           **{f"package/dist/{k}": v for k, v in extra.items()}})


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_the_viewer_is_moved_to_its_path_and_stripped_of_what_is_not_served(
        tmp_path: Path) -> None:
    target = tmp_path / "viewer"
    assert install_viewer(_package(tmp_path / "p.tgz"), target) == "9.9.9"
    assert (target / "VERSION").read_text() == "9.9.9\n"
    html = (target / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in html
    assert 'src="/viewer/app.bundle.0123456789abcdef.js"' in html
    assert 'href="/viewer/manifest.json"' in html and "init-service-worker" not in html
    bundle = target / "app.bundle.0123456789abcdef.js"
    assert '__webpack_require__.p = "/viewer/";' in bundle.read_text()
    assert gzip.decompress((target / f"{bundle.name}.gz").read_bytes()) == bundle.read_bytes()
    assert "url(/viewer/f.woff2)" in (target / "app.bundle.css").read_text()
    assert '"/viewer/assets/i.png"' in (target / "manifest.json").read_text()
    assert not (target / "sw.js").exists() and not (target / "app-config.js").exists()
    assert not (target / "silent-refresh.html").exists()
    assert not (target / "customizations").exists()
    assert bundle.stat().st_mtime > time.time() - 600  # dated at install, not by npm


def test_an_install_that_fails_leaves_the_installed_viewer_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "viewer"
    install_viewer(_package(tmp_path / "good.tgz"), target)
    with pytest.raises(ViewerPackageError, match="not the @ohif/app"):
        install_viewer(_tarball(tmp_path / "other.tgz", {}, name="left-pad"), target)
    assert (target / "VERSION").read_text() == "9.9.9\n"
    assert not (tmp_path / "viewer.new").exists()


@pytest.mark.parametrize("member", ["package/dist/../../escaped.js",
                                    "package/dist/assets/../../../escaped.js"])
def test_a_member_outside_the_folder_is_refused(tmp_path: Path, member: str) -> None:
    tarball = _tarball(tmp_path / "p.tgz", {"package/dist/index.html": INDEX.encode(),
                                            member: b"evil()"})
    with pytest.raises(ViewerPackageError):
        install_viewer(tarball, tmp_path / "viewer")
    assert not list(tmp_path.rglob("escaped.js"))


def test_a_tarball_that_is_not_one_or_lacks_its_index_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(ViewerPackageError, match="not a gzip file"):
        install_viewer(junk, tmp_path / "viewer")
    with pytest.raises(ViewerPackageError, match=r"index\.html"):
        install_viewer(_tarball(tmp_path / "empty.tgz", {}), tmp_path / "viewer")


def test_the_integrity_is_the_npm_sha512(tmp_path: Path) -> None:
    tarball = _package(tmp_path / "p.tgz")
    verify_integrity(tarball, _integrity(tarball))
    with pytest.raises(ViewerPackageError, match="not the pinned one"):
        verify_integrity(tarball, "sha512-" + base64.b64encode(b"x" * 64).decode())
    with pytest.raises(ViewerPackageError, match="unsupported"):
        verify_integrity(tarball, "sha1-abc")


def test_the_command_refuses_a_tarball_of_another_integrity(tmp_path: Path) -> None:
    tarball = _package(tmp_path / "p.tgz")
    command = [sys.executable, "-m", "gateway.cli", "install-viewer", str(tarball)]
    env = {"PASSERELLE_VIEWER_DIR": str(tmp_path / "viewer"), "PATH": "/usr/bin:/bin"}
    refused = subprocess.run([*command, "--integrity", "sha512-AAAA"], env=env, cwd=REPO,
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "not the pinned one" in refused.stderr
    assert not (tmp_path / "viewer").exists()
    done = subprocess.run([*command, "--integrity", _integrity(tarball)], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "9.9.9" in done.stdout, done.stderr
