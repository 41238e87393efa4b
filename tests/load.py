"""Mixed load against one DICOM + DICOMweb server: C-STORE senders and HTTP readers at once.

Each sender is a dcmtk ``storescu`` keeping one association open and storing a CT slice
again and again under new UIDs (``+II``), its own study, until the time is up; its
acknowledgements are counted from its log. (A C client: pynetdicom SCUs on threads of the
measuring process lose a response now and then, pynetdicom issue #850, and take the GIL
from the readers.) Each reader loops over WADO-RS instance retrieve, series metadata, QIDO
and a rendered JPEG of a study stored beforehand. Used by tests/test_load.py and
bench/load.py.
"""

import asyncio
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

from tests.synthetic import ct_slice, part10

DICOM_PART = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
JSON = {"Accept": "application/dicom+json"}


@dataclass
class LoadReport:
    """What a load run did and everything that went wrong."""

    seconds: float = 0.0
    stored: int = 0  # C-STORE responses with status Success
    store_failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    request_failures: list[str] = field(default_factory=list)

    def percentile(self, p: int) -> float:
        """Request latency percentile, in milliseconds."""
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[p - 1] * 1000


def _send(port: int, called: str, seed: Path, deadline: float, report: LoadReport,
          lock: threading.Lock) -> None:
    command = ["storescu", "-v", "--repeat", "10000000", "+II", "-aec", called,
               "127.0.0.1", str(port), str(seed)]
    sender = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    stop = threading.Timer(max(0.0, deadline - time.monotonic()), sender.terminate)
    stop.start()
    stored, failures = 0, []
    assert sender.stdout is not None
    for line in sender.stdout:
        if "Received Store Response (Success)" in line:
            stored += 1
        elif line.startswith(("E:", "F:")) or "Received Store Response" in line:
            failures.append(line.strip())
    sender.wait()
    stop.cancel()
    with lock:
        report.stored += stored
        report.store_failures += failures


def _requests(dicomweb: str, study: str, series: str, instances: list[str],
              patient_id: str) -> list[tuple[str, dict[str, str]]]:
    base = f"{dicomweb}/studies/{study}/series/{series}"
    return [
        *((f"{base}/instances/{uid}", DICOM_PART) for uid in instances[:4]),
        (f"{base}/metadata", JSON),
        (f"{dicomweb}/studies?PatientID={patient_id}", JSON),
        (f"{base}/instances/{instances[0]}/rendered", {"Accept": "image/jpeg"}),
    ]


async def _read(client: httpx.AsyncClient, requests: list[tuple[str, dict[str, str]]],
                start: int, deadline: float, report: LoadReport) -> None:
    turn = start
    while time.monotonic() < deadline:
        url, headers = requests[turn % len(requests)]
        turn += 1
        began = time.perf_counter()
        try:
            response = await client.get(url, headers=headers)
            if response.status_code == 200:
                report.latencies.append(time.perf_counter() - began)
            else:
                report.request_failures.append(f"{response.status_code} {url}")
        except httpx.HTTPError as exc:
            report.request_failures.append(f"{type(exc).__name__} {url}")


async def _readers(dicomweb: str, study: str, readers: int, deadline: float,
                   report: LoadReport) -> None:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(
            max_connections=readers, max_keepalive_connections=readers)) as client:
        listed = (await client.get(f"{dicomweb}/studies/{study}/instances", headers=JSON)).json()
        series = listed[0]["0020000E"]["Value"][0]
        instances = [item["00080018"]["Value"][0] for item in listed
                     if item["0020000E"]["Value"][0] == series]
        studies = (await client.get(f"{dicomweb}/studies?StudyInstanceUID={study}",
                                    headers=JSON)).json()
        patient_id = studies[0]["00100020"]["Value"][0]
        requests = _requests(dicomweb, study, series, instances, patient_id)
        await asyncio.gather(*(_read(client, requests, n, deadline, report)
                               for n in range(readers)))


def run_load(dicom_port: int, called_ae: str, dicomweb: str, read_study: str,
             seconds: float, senders: int = 8, readers: int = 50) -> LoadReport:
    """``senders`` C-STORE associations and ``readers`` concurrent HTTP clients for
    ``seconds`` against one server; ``read_study`` is a stored study the readers fetch."""
    report, lock = LoadReport(), threading.Lock()
    with tempfile.TemporaryDirectory() as folder:
        seeds = []
        for number in range(senders):
            seeds.append(Path(folder) / f"seed{number}.dcm")
            seeds[-1].write_bytes(part10(ct_slice(generate_uid(), generate_uid(), 1, 1,
                                                  size=64)))
        started = time.monotonic()
        deadline = started + seconds
        threads = [threading.Thread(target=_send, args=(dicom_port, called_ae, seed,
                                                        deadline, report, lock))
                   for seed in seeds]
        for thread in threads:
            thread.start()
        asyncio.run(_readers(dicomweb, read_study, readers, deadline, report))
        for thread in threads:
            thread.join(120)
    report.seconds = time.monotonic() - started
    return report


def instance_count(dicomweb: str) -> int:
    """Instances the server lists over all its studies (QIDO, page by page)."""
    total, offset = 0, 0
    while True:
        page = httpx.get(f"{dicomweb}/studies", headers=JSON, timeout=60, params={
            "includefield": "NumberOfStudyRelatedInstances", "limit": 1000, "offset": offset})
        page.raise_for_status()
        studies = page.json() if page.content else []
        total += sum(study["00201208"]["Value"][0] for study in studies)
        if len(studies) < 1000:
            return total
        offset += 1000
