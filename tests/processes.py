"""Start and stop real service processes on loopback ports (tests and benchmarks)."""

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.conformance.registry import registry_problems
from tests.synthetic import NATIONAL_INS

REPO = Path(__file__).resolve().parent.parent


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, and not one handed out before in this run.

    The kernel may give the same ephemeral port to two binds in a row once the first socket
    is closed, so a server asking for its DICOM and HTTP ports back to back could get one
    port twice.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(predicate: object, timeout: float, what: str) -> None:
    """Poll ``predicate()`` until true or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


class _Process:
    """A ``passerelle`` command in a subprocess, ready once ``health_path`` answers 200."""

    health_path = "/health"

    def __init__(self, command: list[str], env: dict[str, str], http_port: int,
                 log_path: Path, tls: ssl.SSLContext | None = None) -> None:
        self.command = command
        self.env = env
        self.http_port = http_port
        self.log_path = log_path
        self.tls = tls  # client side of HTTPS, when the server speaks it
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """Base URL of the HTTP server."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30) -> "_Process":
        """Start and wait until the health path answers 200."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *self.command],
                                     env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self.healthy, timeout, f"{self.command[0]} on {self.base_url}")
        return self

    def __enter__(self) -> "_Process":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def healthy(self) -> bool:
        """True when the process answers 200 on its health path; raises if it died."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.command[0]} exited with {self.proc.returncode}:\n"
                               f"{self.log()}")
        try:
            return httpx.get(f"{self.base_url}{self.health_path}", timeout=1,
                             verify=self.tls or True).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code


class PasserelleProcess(_Process):
    """``passerelle serve`` in a subprocess with its own data dir and ports."""

    def __init__(self, data_dir: Path, tls: ssl.SSLContext | None = None,
                 **settings: str) -> None:
        self.data_dir = data_dir
        self.dicom_port = int(settings.pop("dicom_port", free_port()))
        http_port = int(settings.pop("http_port", free_port()))
        self.ae_title = settings.get("ae_title", "PASSERELLE")
        env = {**os.environ, "PASSERELLE_DATA_DIR": str(data_dir),
               "PASSERELLE_DICOM_PORT": str(self.dicom_port),
               "PASSERELLE_HTTP_PORT": str(http_port),
               **{f"PASSERELLE_{k.upper()}": str(v) for k, v in settings.items()}}
        super().__init__(["serve"], env, http_port,
                         data_dir.parent / f"{data_dir.name}-serve.log", tls)

    def processes(self) -> list[psutil.Process]:
        """The supervisor and every process under it."""
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def _rss_each(self) -> list[int]:
        sizes = []
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):  # a child that just ended
                sizes.append(process.memory_info().rss)
        return sizes

    def rss(self) -> int:
        """Resident memory of the whole service (every process added up): for growth."""
        return sum(self._rss_each())

    def largest_rss(self) -> int:
        """Resident memory of its largest process: for a bound on what one may hold."""
        return max(self._rss_each())

    def metric(self, name: str, **labels: str) -> float:
        """Current value of a Prometheus sample of ``/metrics`` (0 when absent)."""
        text = httpx.get(f"{self.base_url}/metrics", verify=self.tls or True).text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = rf"^{name}(?:{{{re.escape(wanted)}}})? (\S+)$" if labels else rf"^{name} (\S+)$"
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run another ``passerelle`` command on the same data dir."""
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=self.env,
                              cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


class RegistryProcess(_Process):
    """``passerelle registry`` (the local MHD document registry) in a subprocess."""

    health_path = "/fhir/metadata"

    def __init__(self, data_dir: Path, port: int | None = None,
                 tls_arguments: tuple[str, ...] = (), tls: ssl.SSLContext | None = None
                 ) -> None:
        self.data_dir = data_dir
        port = port or free_port()
        super().__init__(["registry", "--port", str(port), "--data", str(data_dir),
                          *tls_arguments], dict(os.environ), port,
                         data_dir.parent / f"{data_dir.name}-registry.log", tls)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop, then check everything the registry stored (tests.conformance.registry:
        PDSm profiles, dicom3tools on each KOS, metadata against its KOS); fails the test
        with every problem found (once: a registry already stopped returns 0)."""
        if self.proc is None:
            return 0
        code = super().stop(sig, timeout)
        problems = registry_problems(self.data_dir)
        assert not problems, ("what the registry received is not conformant:\n  "
                              + "\n  ".join(problems))
        return code

    @property
    def fhir_url(self) -> str:
        """The FHIR base, as PASSERELLE_REGISTRY_URL."""
        return f"{self.base_url}/fhir"

    def documents(self, study: str, status: str = "current,superseded") -> list[dict]:
        """The DocumentReferences of a study of ``national_ct_slice``'s patient (ITI-67)."""
        found = httpx.get(f"{self.fhir_url}/DocumentReference", verify=self.tls or True,
                          params={"patient.identifier": NATIONAL_INS, "status": status,
                                  "related:identifier": study})
        return [entry["resource"] for entry in found.raise_for_status().json()["entry"]]
