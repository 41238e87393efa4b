"""Mixed load against one DICOM + DICOMweb server: C-STORE senders and HTTP readers at once.

Each sender keeps one association open and stores new CT slices of its own study until the
time is up; each reader loops over WADO-RS instance retrieve, series metadata, QIDO and a
rendered JPEG of a study stored beforehand. Used by tests/test_load.py and bench/load.py.
"""

import asyncio
import statistics
import threading
import time
from dataclasses import dataclass, field
from itertools import count

import httpx
from pydicom.uid import generate_uid

from tests.scu import associate
from tests.synthetic import ct_slice

DICOM_PART = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
JSON = {"Accept": "application/dicom+json"}


@dataclass
class LoadReport:
    """What a load run did and everything that went wrong."""

    seconds: float = 0.0
    acknowledged: dict[str, set[str]] = field(default_factory=dict)  # study -> SOP UIDs
    store_failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    request_failures: list[str] = field(default_factory=list)

    @property
    def stored(self) -> int:
        """Instances acknowledged."""
        return sum(len(uids) for uids in self.acknowledged.values())

    def percentile(self, p: int) -> float:
        """Request latency percentile, in milliseconds."""
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[p - 1] * 1000


def _send(port: int, called: str, deadline: float, report: LoadReport,
          lock: threading.Lock) -> None:
    study, series = generate_uid(), generate_uid()
    numbers = count(1)
    first = ct_slice(study, series, 1, next(numbers), size=64)
    acknowledged: set[str] = set()
    with lock:
        report.acknowledged[study] = acknowledged
    assoc = associate(port, [first], called=called, timeout=60)
    if not assoc.is_established:
        with lock:
            report.store_failures.append(f"association to {called} refused")
        return
    ds = first
    try:
        while time.monotonic() < deadline:
            status = assoc.send_c_store(ds)
            if status.get("Status") != 0x0000:
                with lock:
                    report.store_failures.append(f"C-STORE status {status.get('Status')}")
                return
            with lock:
                acknowledged.add(ds.SOPInstanceUID)
            ds = ct_slice(study, series, 1, next(numbers), size=64)
    except (RuntimeError, OSError) as exc:
        with lock:
            report.store_failures.append(f"C-STORE: {exc}")
    finally:
        assoc.release()


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
    started = time.monotonic()
    deadline = started + seconds
    threads = [threading.Thread(target=_send, args=(dicom_port, called_ae, deadline, report,
                                                    lock)) for _ in range(senders)]
    for thread in threads:
        thread.start()
    asyncio.run(_readers(dicomweb, read_study, readers, deadline, report))
    for thread in threads:
        thread.join(120)
    report.seconds = time.monotonic() - started
    return report


def missing_instances(dicomweb: str, acknowledged: dict[str, set[str]]) -> list[str]:
    """Acknowledged SOP Instance UIDs that a QIDO search of their study does not list."""
    missing: list[str] = []
    for study, uids in acknowledged.items():
        listed: set[str] = set()
        offset = 0
        while True:
            page = httpx.get(f"{dicomweb}/studies/{study}/instances",
                             params={"limit": 1000, "offset": offset}, headers=JSON,
                             timeout=60)
            items = page.json() if page.status_code == 200 and page.content else []
            listed |= {item["00080018"]["Value"][0] for item in items}
            if len(items) < 1000:
                break
            offset += 1000
        missing += sorted(uids - listed)
    return missing
