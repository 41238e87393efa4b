"""PACS fetch benchmark: the 300-instance 512x512 CT (``--instances``) stored in an Orthanc
acting as the PACS, then, median of ``--repeat``:

- fetched into passerelle (``POST /admin/fetch``, each run into a new data dir) by C-MOVE
  and by C-GET: seconds until the summary;
- on demand: the study's local copy removed as retention removes it (files deleted,
  ``copy_removed_at`` set), a WADO-RS whole-study request: seconds to its first byte and to
  its last (the study retrieved by C-MOVE, then served);

beside a second Orthanc retrieving the same study from the same PACS through its REST API
(``/modalities/pacs/move``, synchronous; Orthanc 1.10 has no REST C-GET), the study deleted
from it before each run: every row is compared with that.

Orthanc is installed with apt-get when missing.

Usage: python bench/pacs_fetch.py [--repeat 3] [--instances 300]
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from common import REPO, ct_study, install_bench_packages, markdown_table, run_checked
from pydicom import dcmread
from sqlalchemy import text

from gateway.dicom.peer import DicomPeer, Retrieve
from storage.index import Index
from tests.orthanc import OrthancProcess
from tests.processes import PasserelleProcess, free_port

ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def fetch(server: PasserelleProcess, study: str, peer: str) -> None:
    """Fetch ``study`` from ``peer`` through the admin API, to its summary."""
    with httpx.stream("POST", f"{server.base_url}/admin/fetch", timeout=600,
                      json={"study": study, "peer": peer}) as response:
        response.raise_for_status()
        last = [json.loads(line) for line in response.iter_lines() if line][-1]
    if not last.get("complete"):
        raise RuntimeError(f"fetch from {peer} incomplete: {last}")


def purge(data_dir: Path, study: str) -> None:
    """Remove the study's local copy as retention does."""
    index = Index(data_dir / "index.sqlite")
    try:
        for instance in index.instances(study):
            (data_dir / instance.path).unlink()
        with index.transaction() as db:
            db.execute(text("UPDATE studies SET copy_removed_at = :now, copy_held_by = 'PACS'"
                            " WHERE study_uid = :study"), {"now": time.time(), "study": study})
    finally:
        index.close()


def on_demand(server: PasserelleProcess, study: str) -> tuple[float, float]:
    """Seconds to the first byte and to the last of a WADO-RS retrieve of the study."""
    start = time.perf_counter()
    first = None
    with httpx.stream("GET", f"{server.base_url}/dicom-web/studies/{study}", timeout=600,
                      headers={"Accept": ACCEPT_AS_STORED}) as response:
        response.raise_for_status()
        for _ in response.iter_raw(1 << 20):
            if first is None:
                first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start


def orthanc_move(orthanc: OrthancProcess, study: str) -> float:
    """Seconds of Orthanc's own C-MOVE of ``study`` from the PACS to itself (its copy
    deleted first)."""
    found = httpx.post(f"{orthanc.base_url}/tools/lookup", content=study).json()
    for item in found:
        httpx.delete(f"{orthanc.base_url}/studies/{item['ID']}").raise_for_status()
    start = time.perf_counter()
    httpx.post(f"{orthanc.base_url}/modalities/pacs/move", timeout=600, json={
        "Level": "Study", "Resources": [{"StudyInstanceUID": study}],
        "TargetAet": orthanc.ae_title, "Synchronous": True}).raise_for_status()
    return time.perf_counter() - start


def median(run: Callable[[], float], repeat: int) -> float:
    """Median of ``repeat`` values of ``run()``."""
    return statistics.median(run() for _ in range(repeat))


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--instances", type=int, default=300)
    args = parser.parse_args()
    install_bench_packages()

    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-", dir=REPO / "bench"))
    ours_port, http_port = free_port(), free_port()
    second = OrthancProcess(work / "second", ae_title="SECOND", dicomweb=False)
    pacs = OrthancProcess(work / "pacs", {
        "PASSERELLE": DicomPeer("PASSERELLE", "127.0.0.1", ours_port),
        "SECOND": DicomPeer("SECOND", "127.0.0.1", second.dicom_port)},
        ae_title="PACS", dicomweb=False)
    second.modalities = {"pacs": pacs.peer()}
    peers = f"{pacs.peer(Retrieve.MOVE)},PACSGET@127.0.0.1:{pacs.dicom_port}/get"
    runs = iter(range(1_000_000))
    server: PasserelleProcess | None = None

    def new_server() -> PasserelleProcess:
        """A passerelle on a new data dir, on the ports the PACS knows."""
        nonlocal server
        if server is not None:
            server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)
        server = PasserelleProcess(work / f"data{next(runs)}", dicom_port=str(ours_port),
                                   http_port=str(http_port), pacs=peers,
                                   retrieve_wait_seconds="600", log_level="WARNING").start()
        return server

    try:
        files = ct_study(work / "study", instances=args.instances)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        pacs.start()
        second.start()
        run_checked(["storescu", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port),
                     "+sd", str(work / "study")])
        rows: dict[str, tuple[float, float]] = {}

        def fetched(peer: str) -> float:
            target = new_server()
            start = time.perf_counter()
            fetch(target, study, peer)
            return time.perf_counter() - start

        theirs = median(lambda: orthanc_move(second, study), args.repeat)
        for label, peer in (("fetch by C-MOVE, s", "PACS"), ("fetch by C-GET, s", "PACSGET")):
            rows[label] = (median(lambda p=peer: fetched(p), args.repeat), theirs)
            print(f"{label}: done", file=sys.stderr)
        assert server is not None
        firsts, lasts = [], []
        for _ in range(args.repeat):
            purge(server.data_dir, study)
            first, last = on_demand(server, study)
            firsts.append(first)
            lasts.append(last)
        rows["on-demand WADO-RS first byte, s"] = (statistics.median(firsts), theirs)
        rows["on-demand WADO-RS whole study, s"] = (statistics.median(lasts), theirs)
    finally:
        if server is not None:
            server.stop()
        second.stop()
        pacs.stop()
        shutil.rmtree(work, ignore_errors=True)

    table = [[label, f"{ours:.3g}", f"{theirs:.3g}", f"{ours / theirs:.2f}x"]
             for label, (ours, theirs) in rows.items()]
    print(f"{args.instances}-instance CT study ({megabytes:.0f} MB) in Orthanc as the PACS, "
          f"median of {args.repeat}; orthanc: a second Orthanc's /modalities/pacs/move of the "
          "same study, beside every row")
    print(markdown_table(["measure", "passerelle", "orthanc", "passerelle / orthanc"], table))


if __name__ == "__main__":
    main()
