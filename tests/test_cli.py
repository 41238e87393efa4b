"""The ``passerelle`` command as an operator runs it, in subprocesses: where its settings come
from, what it refuses, its help, and the commands that act through a running service over
the control socket of its data dir."""

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from gateway.config import FLAT_NAMES
from tests.issuer import LocalIssuer
from tests.processes import REPO, PasserelleProcess, RegistryProcess, wait_for
from tests.scu import send
from tests.synthetic import national_ct_slice, part10

# Manual publications only (no automatic one within a test), retried fast.
MANUAL = {"stable_seconds": "3600", "publish_retry_seconds": "0.2",
          "publish_retry_max_seconds": "1", "registry_timeout": "2",
          "order_issuer_oid": "1.2.250.1.999.1.1.3"}
# PATH, and PYTHONPATH when set: a worktree sharing another checkout's editable .venv runs its
# own code only through it.
_PYTHON_ENV = {name: os.environ[name] for name in ("PATH", "PYTHONPATH") if name in os.environ}
COMMANDS = ("serve", "import", "studies", "outbox", "publish", "unpublish", "confidentiality",
            "audit", "registry")


def cli(*args: str, cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """``passerelle ARGS`` in ``cwd`` with only the given settings (flat names) in its
    environment: none of the test runner's PASSERELLE_* variables."""
    env = {**_PYTHON_ENV,
           **{f"PASSERELLE_{name.upper()}": value for name, value in settings.items()}}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def _outbox(data_dir: Path) -> list[dict]:
    listed = cli("outbox", "--all", "--json", cwd=data_dir.parent, data_dir=str(data_dir))
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def _store_study(server: PasserelleProcess) -> str:
    study = generate_uid()
    assert send(server.dicom_port, national_ct_slice(study, generate_uid(), 1, 1))[0] == 0
    return study


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(tmp_path / "registry") as process:
        yield process


def test_config_before_or_after_the_command(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.toml").write_text(f'data_dir = "{tmp_path / name}"\n')
    for args, used in [(("--config", "a.toml", "studies"), "a"),
                       (("studies", "--config", "a.toml"), "a"),
                       (("--config", "a.toml", "studies", "--config", "b.toml"), "b")]:
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stderr)
        assert f"data dir {tmp_path / used} does not exist" in result.stderr, args


def test_a_missing_passerelle_config_is_an_error(tmp_path: Path) -> None:
    result = cli("studies", cwd=tmp_path, config=str(tmp_path / "nope.toml"),
                 data_dir=str(tmp_path))
    assert result.returncode == 2
    assert f"config file not found: {tmp_path / 'nope.toml'}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    ("studies",), ("outbox",), ("outbox", "retry", "1"), ("publish", "1.2.3"),
    ("unpublish", "1.2.3"), ("confidentiality", "1.2.3", "--level", "R"), ("audit",)])
def test_a_missing_data_dir_is_named_and_not_created(tmp_path: Path, args: tuple[str]) -> None:
    missing = tmp_path / "nowhere" / "data"
    result = cli(*args, cwd=tmp_path, data_dir=str(missing))
    assert result.returncode == 1
    assert f"data dir {missing} does not exist" in result.stderr
    assert "data_dir, PASSERELLE_DATA_DIR" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_version(tmp_path: Path) -> None:
    result = cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"passerelle {version('passerelle')}\n")


def test_top_level_help_lists_the_commands_and_the_sources_of_settings(tmp_path: Path) -> None:
    text = cli("--help", cwd=tmp_path).stdout
    lines = text.splitlines()
    for name in COMMANDS:
        [at] = [i for i, line in enumerate(lines) if line.split()[:1] == [name]]
        summary = lines[at].split()[1:] or lines[at + 1].split()  # a long name: next line
        assert summary, name
    for words in ("--config FILE", "PASSERELLE_CONFIG", "PASSERELLE_<NAME>", "[dicom]",
                  "[publication]", "each overriding the one before"):
        assert words in text


def test_command_help_names_its_settings_and_variables(tmp_path: Path) -> None:
    studies = cli("studies", "--help", cwd=tmp_path).stdout
    assert "data_dir (PASSERELLE_DATA_DIR)" in studies
    assert "registry_url" not in studies and "--json" in studies and "--config" in studies
    serve = cli("serve", "--help", cwd=tmp_path).stdout
    for flat in FLAT_NAMES:
        assert f"{flat} (PASSERELLE_{flat.upper()})" in serve
    publish = cli("publish", "--help", cwd=tmp_path).stdout
    assert "registry_url (PASSERELLE_REGISTRY_URL)" in publish
    assert "control.sock" in publish
    retry = cli("outbox", "retry", "--help", cwd=tmp_path).stdout
    assert "control.sock" in retry and "data_dir (PASSERELLE_DATA_DIR)" in retry


@pytest.mark.parametrize("args", [("studies",), ("outbox", "--json")])
def test_a_closed_pipe_ends_quietly(tmp_path: Path, args: tuple[str]) -> None:
    (tmp_path / "data").mkdir()
    command = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *args], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=_PYTHON_ENV)
    assert command.stdout is not None and command.stderr is not None
    command.stdout.close()  # the reader is gone before the command writes (`| head -0`)
    stderr = command.stderr.read()
    assert command.wait(60) == 1
    assert stderr == b""


def test_publish_through_a_service_that_sends(tmp_path: Path,
                                              registry: RegistryProcess) -> None:
    data = tmp_path / "data"
    with PasserelleProcess(data, registry_url=registry.fhir_url, **MANUAL) as server:
        study = _store_study(server)
        result = cli("publish", study, cwd=tmp_path, data_dir=str(data))  # no registry_url
        assert result.returncode == 0, result.stderr
        assert result.stdout == (f"publish of study {study} queued as publication 1: the "
                                 f"running service sends it to {registry.fhir_url}\n")
        wait_for(lambda: _outbox(data)[0]["state"] == "acknowledged", 30, "the publication")
        assert len(registry.documents(study)) == 1


def test_publish_through_a_service_without_registry(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with PasserelleProcess(data, **MANUAL) as server:
        study = _store_study(server)
        # This command's own configuration has a registry: the service's is what counts.
        result = cli("confidentiality", study, "--level", "R", cwd=tmp_path,
                     data_dir=str(data), registry_url="http://127.0.0.1:9/fhir")
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            f"confidentiality of study {study} queued as publication 1: the running service "
            "has no registry_url: it stays queued until one is configured\n")
        time.sleep(1.5)  # past the publisher's interval: nothing sends it
        [row] = _outbox(data)
        assert (row["action"], row["state"], row["attempts"]) == (
            "confidentiality", "pending", 0)
        assert json.loads(row["payload"])["level"] == "R"
        missing = cli("publish", "1.2.3.4", cwd=tmp_path, data_dir=str(data))
        assert (missing.returncode, missing.stderr) == (1, "passerelle: no such study 1.2.3.4\n")


def test_outbox_retry_through_the_service(tmp_path: Path, registry: RegistryProcess) -> None:
    data = tmp_path / "data"
    with PasserelleProcess(data, registry_url=registry.fhir_url, **MANUAL) as server:
        study = _store_study(server)
        assert cli("unpublish", study, cwd=tmp_path, data_dir=str(data)).returncode == 0
        wait_for(lambda: _outbox(data)[0]["state"] == "failed", 30, "the refusal")
        pending = cli("outbox", "retry", "1", cwd=tmp_path, data_dir=str(data))
        assert pending.returncode == 0, pending.stderr
        assert pending.stdout == ("publication 1 queued again: the running service sends it "
                                  f"to {registry.fhir_url}\n")
        wait_for(lambda: server.metric("passerelle_publication_attempts_total",
                                       action="unpublish", result="rejected") == 2, 30,
                 "the second attempt, by the service")
        wait_for(lambda: _outbox(data)[0]["state"] == "failed", 30, "the second refusal")
        again = cli("outbox", "retry", "2", cwd=tmp_path, data_dir=str(data))
        assert (again.returncode, again.stderr) == (1, "passerelle: no publication 2\n")


def test_without_a_service_it_is_queued_here_and_sent_when_one_starts(
        tmp_path: Path, registry: RegistryProcess) -> None:
    data, study = tmp_path / "data", generate_uid()
    (tmp_path / "slice.dcm").write_bytes(part10(national_ct_slice(study, generate_uid(), 1, 1)))
    assert cli("import", "--quiet", "slice.dcm", cwd=tmp_path,
               data_dir=str(data)).returncode == 0
    # A socket left by a service that died: nobody listens on it.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(data / "control.sock"))
    plain = cli("publish", study, cwd=tmp_path, data_dir=str(data))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == (
        f"publish of study {study} queued as publication 1: no service is running on {data}: "
        "queued, sent when `passerelle serve` starts (this configuration has no registry_url: "
        "it would stay queued)\n")
    configured = cli("unpublish", study, cwd=tmp_path, data_dir=str(data),
                     registry_url=registry.fhir_url)
    assert configured.stdout == (
        f"unpublish of study {study} queued as publication 2: no service is running on "
        f"{data}: queued, sent when `passerelle serve` starts (this configuration sends to "
        f"{registry.fhir_url})\n")
    assert [(r["action"], r["state"]) for r in _outbox(data)] == [
        ("publish", "pending"), ("unpublish", "pending")]
    with PasserelleProcess(data, registry_url=registry.fhir_url, **MANUAL):
        wait_for(lambda: [r["state"] for r in _outbox(data)] == ["acknowledged"] * 2, 30,
                 "both, sent by the service")
    assert registry.documents(study, "current") == []
    assert len(registry.documents(study, "superseded")) == 1


def test_the_control_socket_is_private_and_removed_at_stop(tmp_path: Path) -> None:
    server = PasserelleProcess(tmp_path / "data").start()
    path = tmp_path / "data" / "control.sock"
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert server.stop() == 0
    assert not path.exists()
    assert "SIGTERM received" in server.log() and "stopped" in server.log()


def test_a_live_control_socket_refuses_the_start(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(tmp_path / "data" / "control.sock"))
        other.listen()
        server = PasserelleProcess(tmp_path / "data")
        started = subprocess.run([sys.executable, "-m", "gateway.cli", "serve"],
                                 env=server.env, cwd=REPO, capture_output=True, text=True,
                                 timeout=60, check=False)
        assert started.returncode == 1
        assert f"a service already answers on {tmp_path / 'data' / 'control.sock'}" \
            in started.stderr
        assert (tmp_path / "data" / "control.sock").exists()


def test_tcp_admin_still_needs_a_token_the_socket_does_not(tmp_path: Path) -> None:
    with LocalIssuer() as issuer, PasserelleProcess(tmp_path / "data",
                                                    **issuer.settings()) as server:
        study = _store_study(server)
        for method, path in [("POST", f"/admin/studies/{study}/publish"),
                             ("POST", "/admin/outbox/1/retry"), ("GET", "/admin/outbox"),
                             ("GET", "/admin/studies")]:
            refused = httpx.request(method, server.base_url + path)
            assert refused.status_code == 401, path
            assert refused.json()["error"]
        local = httpx.Client(transport=httpx.HTTPTransport(
            uds=str(tmp_path / "data" / "control.sock")), base_url="http://passerelle")
        with local:
            [listed] = local.get("/admin/studies").json()["studies"]
            assert listed["study_uid"] == study
            queued = local.post(f"/admin/studies/{study}/publish")
            assert queued.status_code == 202
            assert queued.json()["will_send"] is False
            one = local.get(f"/admin/studies/{study}").json()
            assert [p["id"] for p in one["publications"]] == [queued.json()["publication"]["id"]]
            assert [p["state"] for p in local.get("/admin/outbox").json()["publications"]] \
                == ["pending"]


def test_a_running_service_whose_socket_is_gone_is_not_called_absent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with PasserelleProcess(data, **MANUAL) as server:
        study = _store_study(server)
        (data / "control.sock").unlink()  # removed by hand: the service still holds the lock
        result = cli("publish", study, cwd=tmp_path, data_dir=str(data))
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            f"publish of study {study} queued as publication 1: a service holds {data} but "
            "its control socket does not answer: queued in its index, sent on its next pass "
            "if it has a registry_url (`passerelle outbox` tells)\n")


def test_a_data_dir_too_deep_for_a_socket_serves_without_one(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 60) / ("e" * 60) / "data"  # over the 107 bytes of an address
    data.parent.mkdir(parents=True)
    with PasserelleProcess(data, **MANUAL) as server:
        study = _store_study(server)
        assert not (data / "control.sock").exists()
        assert "no control socket" in server.log()
        result = cli("publish", study, cwd=tmp_path, data_dir=str(data))
        assert result.returncode == 0, result.stderr
        assert "a service holds" in result.stdout


def test_an_answer_that_is_not_the_admin_api_is_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    # Something else answers on the socket, with a body that is not JSON.
    with socket.socket(socket.AF_UNIX) as impostor:
        impostor.bind(str(data / "control.sock"))
        impostor.listen()

        def answer() -> None:
            request = b""
            while not request:  # the first connection is the command's probe
                connection, _ = impostor.accept()
                with connection:
                    request = connection.recv(65536)
                    if request:
                        connection.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 12"
                                           b"\r\nconnection: close\r\n\r\nproxy failed")

        thread = threading.Thread(target=answer)
        thread.start()
        result = cli("publish", "1.2.3.4", cwd=tmp_path, data_dir=str(data))
        thread.join(10)
    assert result.returncode == 1
    assert result.stderr == (f"passerelle: unexpected answer from the service on {data}: "
                             "HTTP 502 proxy failed\n")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", ["99999999999999999999", "0", "²", "-1"])
def test_a_malformed_publication_id_is_a_usage_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "data").mkdir()
    result = cli("outbox", "retry", text, cwd=tmp_path, data_dir=str(tmp_path / "data"))
    assert result.returncode == 2
    assert "publication id must be a number from 1 to" in result.stderr
    assert "Traceback" not in result.stderr
