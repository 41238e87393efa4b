"""dcmtk's ``dcmqrscp``: a second, stricter PACS for the tests (C-FIND and C-MOVE SCP,
Patient and Study Root; C-STORE SCP to load it)."""

import subprocess
from pathlib import Path

from gateway.dicom.peer import DicomPeer, Retrieve
from tests.processes import free_port, wait_for


class DcmqrscpProcess:
    """``dcmqrscp`` on a loopback port, its database under ``work_dir``; it moves studies to
    the ``destinations`` only (its HostTable)."""

    def __init__(self, work_dir: Path, destinations: dict[str, DicomPeer] | None = None,
                 ae_title: str = "DCMQRSCP") -> None:
        self.work_dir = work_dir
        self.destinations = destinations or {}
        self.ae_title = ae_title
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def peer(self) -> DicomPeer:
        """This dcmqrscp as a PACS peer (C-MOVE: it has no C-GET without a role profile)."""
        return DicomPeer(self.ae_title, "127.0.0.1", self.port, Retrieve.MOVE)

    def start(self) -> "DcmqrscpProcess":
        """Write its configuration, start it and wait for its port."""
        database = self.work_dir / "db"
        database.mkdir(parents=True, exist_ok=True)
        hosts = [f"{name} = ({peer.ae_title}, {peer.host}, {peer.port})"
                 for name, peer in self.destinations.items()]
        config = "\n".join([
            f"NetworkTCPPort = {self.port}", "MaxPDUSize = 16384", "MaxAssociations = 16",
            "HostTable BEGIN", *hosts, "HostTable END", "VendorTable BEGIN", "VendorTable END",
            "AETable BEGIN", f"{self.ae_title} {database} RW (200, 1024mb) ANY", "AETable END",
            ""])
        path = self.work_dir / "dcmqrscp.cfg"
        path.write_text(config)
        # One process per association: its --single-process mode crashed after a C-ECHO.
        log = (self.work_dir / "dcmqrscp.log").open("ab")
        self.proc = subprocess.Popen(["dcmqrscp", "-c", str(path)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._up, 30, "dcmqrscp")
        return self

    def _up(self) -> bool:
        return subprocess.run(["echoscu", "-aec", self.ae_title, "127.0.0.1", str(self.port)],
                              capture_output=True, check=False).returncode == 0

    def load(self, files: list[Path]) -> None:
        """Store ``files`` into it with dcmtk's storescu."""
        result = subprocess.run(["storescu", "-aec", self.ae_title, "127.0.0.1", str(self.port),
                                 *map(str, files)], capture_output=True, text=True,
                                check=False, timeout=120)
        assert result.returncode == 0, result.stderr

    def stop(self) -> None:
        """Terminate dcmqrscp."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None
