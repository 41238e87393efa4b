"""Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``) as a benchmark peer."""

import json
import shutil
import subprocess
from pathlib import Path

import httpx

from tests.processes import free_port, wait_for

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancProcess:
    """Orthanc on loopback ports with a config written to ``work_dir``."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = "ORTHANC"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """Base URL of Orthanc's REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "OrthancProcess":
        """Write the config, start Orthanc and wait for its REST API."""
        binary = shutil.which("Orthanc")
        if binary is None or not DICOMWEB_PLUGIN.exists():
            raise RuntimeError("Orthanc not installed: apt-get install orthanc orthanc-dicomweb")
        storage = self.work_dir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "DicomAet": self.ae_title, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        config_path = self.work_dir / "orthanc.json"
        config_path.write_text(json.dumps(config))
        log = (self.work_dir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([binary, str(config_path)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._up, 60, "Orthanc")
        return self

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/system", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Terminate Orthanc."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None
