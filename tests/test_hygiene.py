"""Hygiene of the running service: log lines that cannot be forged, files closed to the world
whatever the umask it was started with, malformed numbers answered 400, request heads bounded
as documented. Against real ``passerelle serve`` (and ``registry``, ``import``) processes."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.processes import REPO, PasserelleProcess, RegistryProcess, wait_for
from tests.scu import send
from tests.synthetic import ct_slice, national_ct_slice

# A whole record as the service writes one: what a forged line would look like.
FORGED = "2026-01-01 00:00:00,000 CRITICAL passerelle: forged by the"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasserelleProcess]:
    with PasserelleProcess(tmp_path_factory.mktemp("hygiene") / "data") as process:
        yield process


@pytest.fixture(scope="module")
def instance(service: PasserelleProcess) -> str:
    """The WADO-RS path of one stored 8x8 CT slice."""
    study, series = generate_uid(), generate_uid()
    ds = ct_slice(study, series, 1, 1, size=8)
    assert send(service.dicom_port, ds)[0] == 0x0000
    return f"/dicom-web/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}"


def _lines(process: PasserelleProcess) -> list[str]:
    return process.log().splitlines()


# --- 17: log lines ----------------------------------------------------------------------

def test_a_newline_in_a_request_path_cannot_forge_a_log_line(service: PasserelleProcess
                                                             ) -> None:
    forged = f"{FORGED} path"
    # Refused, and logged with its path, by the manifest scope: the KOS named is unknown.
    response = httpx.get(f"{service.base_url}/dicom-web/studies/1.2.3%0a{quote(forged)}",
                         headers={"KOS-SOPInstanceUID": generate_uid()})
    assert response.status_code == 403
    wait_for(lambda: f"1.2.3\\n{forged}" in service.log(), 10, "the refusal in the log")
    assert not any(line.startswith(forged) for line in _lines(service))


def test_a_newline_in_a_data_set_uid_cannot_forge_a_log_line(service: PasserelleProcess,
                                                             tmp_path: Path) -> None:
    forged = f"{FORGED} C-STORE"
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4)
    announced = ds.SOPInstanceUID
    ds.SOPInstanceUID = f"{announced}\n{forged}"
    path = tmp_path / "forged.dcm"
    ds.preamble = bytes(128)
    ds.save_as(path)  # as it is: the file meta, sent as the C-STORE's, keeps the announced UID
    status, _ = send(service.dicom_port, path)
    assert status != 0x0000
    wait_for(lambda: f"{announced}\\n{forged}" in service.log(), 10, "the refusal in the log")
    assert not any(line.startswith(forged) for line in _lines(service))


# --- 19: files ---------------------------------------------------------------------------

FAST = {"stable_seconds": "1", "publish_retry_seconds": "0.2", "publish_retry_max_seconds": "1",
        "order_issuer_oid": "1.2.250.1.999.1.1.3", "accession_issuer_oid": "1.2.250.1.999.1.1.2"}


def _start_with_open_umask(process: PasserelleProcess | RegistryProcess) -> None:
    """Start ``process`` as ``start`` does, but with umask 000: the process's own, and only
    its own, must close what it creates."""
    with process.log_path.open("ab") as log:
        process.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *process.command], env=process.env, cwd=REPO,
            stdout=log, stderr=subprocess.STDOUT, umask=0)
    wait_for(process.healthy, 30, f"{process.command[0]} on {process.base_url}")


def _cli(process: PasserelleProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Another ``passerelle`` command on the data dir, with umask 000."""
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=process.env,
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
                          umask=0)


def _open_to_the_world(root: Path) -> list[str]:
    """Everything under ``root`` (``root`` included) that others may read, write or enter."""
    found = []
    for folder, directories, files in os.walk(root):
        for path in [Path(folder), *(Path(folder) / name for name in directories + files)]:
            mode = path.lstat().st_mode
            if mode & 0o007 and not stat.S_ISLNK(mode):
                found.append(f"{path.relative_to(root.parent)} {stat.filemode(mode)}")
    return sorted(set(found))


def _acknowledged(process: PasserelleProcess, study: str) -> bool:
    rows = json.loads(_cli(process, "outbox", "--all", "--json").stdout)
    return any(row["study_uid"] == study and row["state"] == "acknowledged" for row in rows)


def test_nothing_created_is_open_to_the_world(tmp_path: Path, ct_study: list[Path]) -> None:
    registry = RegistryProcess(tmp_path / "registry")
    _start_with_open_umask(registry)
    server = PasserelleProcess(tmp_path / "data", registry_url=registry.fhir_url, **FAST)
    try:
        _start_with_open_umask(server)
        study, series = generate_uid(), generate_uid()
        ds = national_ct_slice(study, series, 1, 1)
        assert send(server.dicom_port, ds)[0] == 0x0000  # index, its WAL, the file
        rendered = httpx.get(f"{server.base_url}/dicom-web/studies/{study}/series/{series}/"
                             f"instances/{ds.SOPInstanceUID}/rendered")
        assert rendered.status_code == 200  # the render cache
        _cli(server, "import", "--quiet", *map(str, ct_study[:2]))  # the import command's
        # The study is published once stable: its manifest, the registry's own store (the
        # imported study has no INS of its own: it is not published).
        wait_for(lambda: _acknowledged(server, study), 60, "the publication acknowledged")
        assert (server.data_dir / "control.sock").stat().st_mode & 0o777 == 0o600
        assert (server.data_dir / "deidentify.key").stat().st_mode & 0o777 == 0o600
        assert (server.data_dir / "index.sqlite-wal").exists()
        assert list((server.data_dir / "manifests").rglob("*.dcm"))
        assert any(path.is_file() for path in (server.data_dir / "cache").rglob("*"))
        assert list((server.data_dir / "audit").iterdir())
        for root in (server.data_dir, registry.data_dir):
            assert not (found := _open_to_the_world(root)), "\n".join(found)
        # An unclean stop, and a file the index does not know that cannot be read: the next
        # start quarantines it.
        server.stop(signal.SIGKILL)
        unreadable = server.data_dir / "studies" / study / series / "2.25.1.dcm"
        unreadable.write_bytes(b"not DICOM")
        unreadable.chmod(0o600)
        _start_with_open_umask(server)
        assert (server.data_dir / "quarantine" / unreadable.name).exists()
        assert not (found := _open_to_the_world(server.data_dir)), "\n".join(found)
    finally:
        server.stop()
        registry.stop()


# --- 20: numbers -------------------------------------------------------------------------

@pytest.mark.parametrize("path, message", [
    # The three found: str.isdigit, SQLite's integers, a tag over 32 bits.
    ("/dicom-web/studies?limit=\u00b2", "limit must be a number from 0 to"),
    ("/dicom-web/instances?InstanceNumber=" + "9" * 30, "InstanceNumber must be a number"),
    ("{instance}/bulkdata/1FFFFFFFF", "bulk data tag must be 8 hexadecimal digits"),
    # Their neighbours.
    ("/dicom-web/studies?offset=\u00b2", "offset must be a number"),
    ("/dicom-web/studies?limit=\u0663", "limit must be a number"),
    ("/dicom-web/instances?Rows=" + "9" * 20, "Rows must be a number from 0 to 65535"),
    ("/dicom-web/instances?InstanceNumber=-" + "9" * 30, "InstanceNumber must be a number"),
    ("{instance}/frames/\u0661", "frame list must be"),
    ("{instance}/frames/1/rendered?viewport=1e20,1e20", "viewport sizes"),
    ("{instance}/rendered?viewport=8,8,0,0,1e20,4", "viewport source size"),
    ("{instance}/rendered?window=nan,nan", "window must be a decimal number"),
    ("{instance}/rendered?window=1e400,400", "window must be a decimal number"),
    ("{instance}/rendered?quality=1e2", "quality must be a number from 1 to 100"),
    ("/wado?requestType=WADO&{uri}&windowCenter=inf&windowWidth=400", "windowCenter must be"),
    ("/wado?requestType=WADO&{uri}&rows=64.0", "rows must be a number"),
])
def test_malformed_numbers_are_400(service: PasserelleProcess, instance: str, path: str,
                                   message: str) -> None:
    _, study, _, series, _, sop = instance.rsplit("/", 5)
    uri = f"studyUID={study}&seriesUID={series}&objectUID={sop}"
    response = httpx.get(service.base_url + path.format(instance=instance, uri=uri))
    assert (response.status_code, message in response.text) == (400, True), response.text


def test_a_publication_id_beyond_sqlite_integers_is_400(service: PasserelleProcess) -> None:
    response = httpx.post(f"{service.base_url}/admin/outbox/{'9' * 20}/retry")
    assert response.status_code == 400
    assert "publication id must be a number" in response.json()["error"]
    assert httpx.post(f"{service.base_url}/admin/outbox/1/retry").status_code == 404


def test_well_formed_numbers_still_work(service: PasserelleProcess, instance: str) -> None:
    for path in ("/dicom-web/instances?InstanceNumber=1&limit=5&offset=0",
                 f"{instance}/frames/1", f"{instance}/bulkdata/7FE00010",
                 f"{instance}/rendered?viewport=16,16&window=40,400&quality=80"):
        assert httpx.get(service.base_url + path).status_code == 200, path
    assert "Exception in ASGI application" not in service.log()  # no 500 in this module


# --- 21: request heads -------------------------------------------------------------------

def _head_answer(service: PasserelleProcess, size: int) -> bytes:
    """The status line answering a GET /health whose head is ``size`` bytes, sent at once."""
    start, end = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ", b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", service.http_port), timeout=10) as sock:
        sock.sendall(start + b"a" * (size - len(start) - len(end)) + end)
        return sock.makefile("rb").readline().strip()


def test_request_heads_are_bounded_at_16_kib(service: PasserelleProcess) -> None:
    refused = service.metric("passerelle_http_connections_closed_total",
                             reason="head_too_large")
    assert _head_answer(service, 15 << 10) == b"HTTP/1.1 200 OK"
    assert _head_answer(service, 16 << 10) == b"HTTP/1.1 200 OK"
    for size in (17 << 10, 80 << 10):
        assert _head_answer(service, size) == b"HTTP/1.1 400 Bad Request"
    assert service.metric("passerelle_http_connections_closed_total",
                          reason="head_too_large") == refused + 2
    assert "its head is over 16384 bytes" in service.log()
