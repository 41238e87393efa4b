"""Mixed load, passerelle beside Orthanc + DICOMweb plugin, same workload, same run.

8 dcmtk storescu associations storing 64x64 CT slices under new UIDs and 50 concurrent HTTP
clients (httpx, one asyncio loop) looping
over WADO-RS instance retrieve, series metadata, QIDO and a rendered JPEG, for ``--seconds``
against each server in turn (never both at once: they would share the two cores). Reports
instances stored, retrievals, latency percentiles, errors, and acknowledged instances that
QIDO does not list afterwards (lost); and the CPU each side used, in % of one core: the
server (every process of it), the load generator (this process: the HTTP clients and the
threads reading storescu's output, on one interpreter, so 100 % is its ceiling) and the
storescu senders. On a small machine the generator's ceiling is a bound on the retrievals
of any server.

Usage: python bench/load.py [--seconds 60] [--senders 8] [--readers 50]
"""

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from common import REPO, markdown_table, run_checked
from pydicom import dcmread

from tests.load import LoadReport, instance_count, run_load
from tests.orthanc import OrthancProcess
from tests.processes import PasserelleProcess
from tests.synthetic import write_ct_study


@dataclass
class CpuShares:
    """CPU used during the load, in % of one core."""

    server: float
    generator: float
    senders: float


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def measure(peer: PasserelleProcess | OrthancProcess, study_dir: Path, study_uid: str,
            args: argparse.Namespace) -> tuple[LoadReport, int, CpuShares]:
    """Load one server; the report, how many acknowledged instances it lost, and the CPU
    each side used."""
    peer.start()
    try:
        run_checked(["storescu", "-aec", peer.ae_title, "127.0.0.1", str(peer.dicom_port),
                     "+sd", str(study_dir)])
        root = f"{peer.base_url}/dicom-web"
        before = instance_count(root)
        assert peer.proc is not None
        root_process = psutil.Process(peer.proc.pid)
        server = [root_process, *root_process.children(recursive=True)]
        generator = psutil.Process()
        server_before, generator_before = _cpu_seconds(server), sum(generator.cpu_times()[:2])
        senders_before = sum(generator.cpu_times()[2:4])  # of children waited for
        report = run_load(peer.dicom_port, peer.ae_title, root, study_uid, args.seconds,
                          args.senders, args.readers)
        times = generator.cpu_times()
        shares = CpuShares(
            100 * (_cpu_seconds(server) - server_before) / report.seconds,
            100 * (sum(times[:2]) - generator_before) / report.seconds,
            100 * (sum(times[2:4]) - senders_before) / report.seconds)
        return report, max(0, report.stored - (instance_count(root) - before)), shares
    finally:
        peer.stop()


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--readers", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-", dir=REPO / "bench"))
    try:
        files = write_ct_study(work / "study", series=3, per_series=5)
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        results = {}
        for name, peer in (("passerelle", PasserelleProcess(work / "data")),
                           ("orthanc", OrthancProcess(work / "orthanc"))):
            results[name] = measure(peer, work / "study", study_uid, args)
            print(f"{name}: done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def row(label: str, value: Callable[[LoadReport, int, CpuShares], float]) -> list[str]:
        ours, theirs = (value(*results[name]) for name in ("passerelle", "orthanc"))
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        return [label, f"{ours:.4g}", f"{theirs:.4g}", ratio]

    table = [
        row("instances stored /s", lambda r, lost, cpu: r.stored / r.seconds),
        row("retrievals /s", lambda r, lost, cpu: len(r.latencies) / r.seconds),
        row("retrieval p50 ms", lambda r, lost, cpu: r.percentile(50)),
        row("retrieval p95 ms", lambda r, lost, cpu: r.percentile(95)),
        row("retrieval p99 ms", lambda r, lost, cpu: r.percentile(99)),
        row("failed stores", lambda r, lost, cpu: len(r.store_failures)),
        row("failed retrievals", lambda r, lost, cpu: len(r.request_failures)),
        row("acknowledged but lost", lambda r, lost, cpu: lost),
        row("server CPU, % of a core", lambda r, lost, cpu: cpu.server),
        row("load generator CPU, % of a core (ceiling 100)", lambda r, lost, cpu: cpu.generator),
        row("storescu senders CPU, % of a core", lambda r, lost, cpu: cpu.senders),
    ]
    print(f"{args.senders} C-STORE associations + {args.readers} HTTP clients, "
          f"{args.seconds:.0f} s each")
    print(markdown_table(["measure", "passerelle", "orthanc", "passerelle / orthanc"], table))
    for name, (report, _, _) in results.items():
        for failure in (report.store_failures + report.request_failures)[:5]:
            print(f"{name}: {failure}", file=sys.stderr)


if __name__ == "__main__":
    main()
