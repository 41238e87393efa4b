"""DICOMweb benchmark, passerelle beside Orthanc + DICOMweb plugin, same data, same run.

- WADO-RS whole-study retrieve of the 300-instance 512x512 CT (158 MB, ``--instances``), as
  stored (``transfer-syntax=*``), through an httpx client (what dicomweb-client and viewers'
  back ends use) and through curl: MB/s, median of ``--repeat``; whether the response
  announced its Content-Length (else it was chunked);
- WADO-RS study metadata of the same study: seconds, median;
- QIDO-RS ``/studies?PatientID=`` and ``/studies?StudyDate=<range>`` with ``--studies``
  studies indexed (tiny one-instance studies), p50 and p95 over ``--queries`` requests.

Orthanc and curl are installed with apt-get when missing.

Usage: python bench/dicomweb.py [--repeat 5] [--studies 10000] [--queries 200] [--instances 300]
"""

import argparse
import concurrent.futures
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import REPO, ct_study, install_bench_packages, markdown_table, run_checked
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.orthanc import OrthancProcess
from tests.processes import PasserelleProcess
from tests.synthetic import ct_slice

ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def timed(function: object, repeat: int) -> list[float]:
    """Wall times of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times


def retrieve_study(client: httpx.Client, root: str, study: str) -> tuple[int, bool]:
    """Stream a whole study: the number of bytes received, and whether the response
    announced their number (Content-Length; else chunked)."""
    total = 0
    with client.stream("GET", f"{root}/studies/{study}",
                       headers={"Accept": ACCEPT_AS_STORED}) as response:
        response.raise_for_status()
        for chunk in response.iter_raw(1 << 20):
            total += len(chunk)
    announced = response.headers.get("content-length")
    if announced is not None and int(announced) != total:
        raise RuntimeError(f"{root}: Content-Length {announced}, {total} bytes received")
    return total, announced is not None


def curl_study(root: str, study: str) -> None:
    """The whole study through curl, to /dev/null."""
    subprocess.run(["curl", "--silent", "--fail", "--output", "/dev/null", "--header",
                    f"Accept: {ACCEPT_AS_STORED}", f"{root}/studies/{study}"], check=True)


def metadata(client: httpx.Client, root: str, study: str) -> None:
    response = client.get(f"{root}/studies/{study}/metadata")
    response.raise_for_status()
    assert len(response.json()) > 0


def tiny_study(number: int) -> bytes:
    """A one-instance study for the QIDO index (8x8 pixels); patient P<number // 2>."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8,
                  patient_id=f"P{number // 2:05d}", accession=f"A{number:06d}",
                  StudyDate=f"2025{1 + number % 12:02d}{1 + number % 28:02d}")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def load_tiny_studies(count: int, passerelle: PasserelleProcess, orthanc: OrthancProcess) -> None:
    """Index ``count`` tiny studies in both servers (passerelle, stopped, by import into its
    data dir; Orthanc by REST)."""
    folder = passerelle.data_dir.parent / "tiny"
    folder.mkdir(exist_ok=True)
    blobs = [tiny_study(n) for n in range(count)]
    for n, blob in enumerate(blobs):
        (folder / f"{n}.dcm").write_bytes(blob)
    run_checked([sys.executable, "-m", "gateway.cli", "import", "--quiet", str(folder)],
                passerelle.env)

    def post(blob: bytes) -> None:
        httpx.post(f"{orthanc.base_url}/instances", content=blob, timeout=60).raise_for_status()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(post, blobs))


def qido_latencies(client: httpx.Client, url: str, queries: list[dict[str, str]]
                   ) -> tuple[float, float]:
    """p50 and p95 (ms) of the queries."""
    times = []
    for params in queries:
        start = time.perf_counter()
        response = client.get(url, params=params)
        response.raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--instances", type=int, default=300)
    args = parser.parse_args()
    install_bench_packages()

    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-", dir=REPO / "bench"))
    ours = PasserelleProcess(work / "data")
    theirs = OrthancProcess(work / "orthanc")
    try:
        files = ct_study(work / "study", instances=args.instances)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        study = dcmread(files[0], stop_before_pixels=True)
        study_uid = study.StudyInstanceUID
        ours.start()
        theirs.start()
        for peer in (ours, theirs):
            run_checked(["storescu", "-aec", peer.ae_title, "127.0.0.1", str(peer.dicom_port),
                         "+sd", str(work / "study")])
        roots = {"passerelle": f"{ours.base_url}/dicom-web",
                 "orthanc": f"{theirs.base_url}/dicom-web"}
        rows: dict[str, dict[str, float]] = {name: {} for name in roots}
        framing: dict[str, str] = {}
        with httpx.Client(timeout=300) as client:
            for name, root in roots.items():
                size, announced = retrieve_study(client, root, study_uid)  # warm-up, size
                framing[name] = "Content-Length" if announced else "chunked"
                runs = timed(lambda r=root: retrieve_study(client, r, study_uid), args.repeat)
                rows[name]["retrieve MB/s, httpx"] = size / 1e6 / statistics.median(runs)
                runs = timed(lambda r=root: curl_study(r, study_uid), args.repeat)
                rows[name]["retrieve MB/s, curl"] = size / 1e6 / statistics.median(runs)
                metadata(client, root, study_uid)
                runs = timed(lambda r=root: metadata(client, r, study_uid), args.repeat)
                rows[name]["metadata s"] = statistics.median(runs)
                print(f"{name}: retrieve and metadata done", file=sys.stderr)
            print(f"loading {args.studies} studies into both indexes...", file=sys.stderr)
            ours.stop()
            ours.env["PASSERELLE_LOG_LEVEL"] = "WARNING"
            start = time.perf_counter()
            load_tiny_studies(args.studies, ours, theirs)
            print(f"loaded in {time.perf_counter() - start:.0f}s", file=sys.stderr)
            ours.start()
            patients = [{"PatientID": f"P{n:05d}"} for n in range(0, args.studies // 2,
                                                                  max(1, args.studies //
                                                                      2 // args.queries))]
            dates = [{"StudyDate": f"2025{m:02d}01-2025{m:02d}07"} for m in range(1, 13)]
            dates = (dates * (args.queries // len(dates) + 1))[:args.queries]
            for name, root in roots.items():
                for label, queries in (("PatientID", patients), ("StudyDate range", dates)):
                    p50, p95 = qido_latencies(client, f"{root}/studies", queries)
                    rows[name][f"QIDO {label} p50 ms"] = p50
                    rows[name][f"QIDO {label} p95 ms"] = p95
    finally:
        ours.stop()
        theirs.stop()
        shutil.rmtree(work, ignore_errors=True)

    metrics = list(rows["passerelle"])
    table = [[metric, f"{rows['passerelle'][metric]:.3g}", f"{rows['orthanc'][metric]:.3g}",
              f"{rows['passerelle'][metric] / rows['orthanc'][metric]:.2f}x"]
             for metric in metrics]
    print(f"{args.instances}-instance CT study ({megabytes:.0f} MB), "
          f"{args.studies} studies indexed, median of {args.repeat}, {args.queries} queries")
    print(markdown_table(["measure", "passerelle", "orthanc", "passerelle / orthanc"], table))
    print("whole-study response framing: " + ", ".join(f"{name} {how}"
                                                       for name, how in framing.items()))
    print("targets: retrieve through httpx >= 1.0x Orthanc; QIDO p50 <= 10 ms")


if __name__ == "__main__":
    main()
