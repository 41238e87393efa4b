"""Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``): the benchmarks' peer, and the
tests' PACS (C-FIND, C-MOVE, C-GET SCP, with a REST API to load and inspect studies)."""

import json
import shutil
import subprocess
from pathlib import Path

import httpx

from gateway.dicom.peer import DicomPeer, Retrieve
from tests.processes import free_port, wait_for

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancProcess:
    """Orthanc on loopback ports with a config written to ``work_dir``; ``modalities`` are
    the DICOM peers it may answer and move studies to, by name (Orthanc's DicomModalities:
    all of C-ECHO, C-FIND, C-MOVE, C-GET, C-STORE allowed)."""

    def __init__(self, work_dir: Path, modalities: dict[str, DicomPeer] | None = None,
                 ae_title: str = "ORTHANC", dicomweb: bool = True) -> None:
        self.work_dir = work_dir
        self.modalities = modalities or {}
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = ae_title
        self.dicomweb = dicomweb
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """Base URL of Orthanc's REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    def peer(self, retrieve: Retrieve = Retrieve.MOVE) -> DicomPeer:
        """This Orthanc as a PACS peer (``PASSERELLE_PACS`` is ``str()`` of it)."""
        return DicomPeer(self.ae_title, "127.0.0.1", self.dicom_port, retrieve)

    def start(self) -> "OrthancProcess":
        """Write the config, start Orthanc and wait for its REST API."""
        binary = shutil.which("Orthanc")
        if binary is None or (self.dicomweb and not DICOMWEB_PLUGIN.exists()):
            raise RuntimeError("Orthanc not installed: apt-get install orthanc orthanc-dicomweb")
        storage = self.work_dir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "Name": self.ae_title, "StorageDirectory": str(storage),
            "IndexDirectory": str(storage), "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomScuTimeout": 30,
            "DicomModalities": {
                name: {"AET": peer.ae_title, "Host": peer.host, "Port": peer.port,
                       "AllowEcho": True, "AllowFind": True, "AllowMove": True,
                       "AllowGet": True, "AllowStore": True}
                for name, peer in self.modalities.items()},
        }
        if self.dicomweb:
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
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

    def upload(self, item: Path | bytes) -> str:
        """Store one Part 10 file through the REST API; its Orthanc instance ID."""
        body = item.read_bytes() if isinstance(item, Path) else item
        response = httpx.post(f"{self.base_url}/instances", content=body, timeout=60)
        response.raise_for_status()
        return str(response.json()["ID"])

    def _lookup(self, uid: str, kind: str) -> str:
        response = httpx.post(f"{self.base_url}/tools/lookup", content=uid, timeout=30)
        response.raise_for_status()
        ids = [item["ID"] for item in response.json() if item["Type"] == kind]
        if not ids:
            raise KeyError(f"Orthanc holds no {kind} {uid}")
        return str(ids[0])

    def delete_instance(self, sop_uid: str) -> None:
        """Delete one instance, by SOP Instance UID."""
        orthanc_id = self._lookup(sop_uid, "Instance")
        httpx.delete(f"{self.base_url}/instances/{orthanc_id}", timeout=30).raise_for_status()

    def sop_uids(self, study_uid: str) -> set[str]:
        """The SOP Instance UIDs Orthanc holds of a study (empty when it holds none)."""
        try:
            orthanc_id = self._lookup(study_uid, "Study")
        except KeyError:
            return set()
        response = httpx.get(f"{self.base_url}/studies/{orthanc_id}/instances", timeout=60)
        response.raise_for_status()
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in response.json()}

    def stop(self) -> None:
        """Terminate Orthanc."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None
