"""Ingest benchmark: one storescu association of a 300-instance 512x512 16-bit CT study.

Sent, in the same run, to passerelle (fsync durability on), to Orthanc + DICOMweb plugin
(Debian packages), to a bare pynetdicom SCP that only writes the received bytes, and to a
pynetdicom SCP that does nothing (the ceiling of any pynetdicom-based receiver).
Each peer starts on a fresh storage folder for every repetition; only the storescu call is
timed; the median is kept.

Usage: python bench/ingest.py [--repeat 3] [--instances 300]
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, ct_study, markdown_table, run_checked
from orthanc import OrthancProcess

from tests.processes import PasserelleProcess, free_port, wait_for

MAX_PDU = 262144  # passerelle's default, used for the bare SCP too


class BareScp:
    """bench/bare_scp.py in a subprocess."""

    ae_title = "BARE"

    def __init__(self, folder: Path, no_io: bool = False) -> None:
        self.folder = folder
        self.options = ["--no-io"] if no_io else []
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "BareScp":
        self.proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "bare_scp.py"),
                                      str(self.dicom_port), str(self.folder), str(MAX_PDU),
                                      *self.options])
        wait_for(self._listening, 30, "bare SCP")
        return self

    def _listening(self) -> bool:
        result = subprocess.run(["echoscu", "-aec", "BARE", "127.0.0.1", str(self.dicom_port)],
                                capture_output=True, check=False)
        return result.returncode == 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def time_one_send(make_peer: object, storage: Path, study: Path) -> float:
    """Start a fresh peer, time one storescu association of the whole study, stop it."""
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    peer = make_peer(storage).start()  # type: ignore[operator]
    try:
        start = time.perf_counter()
        run_checked(["storescu", "-aet", "BENCH", "-aec", peer.ae_title, "127.0.0.1",
                     str(peer.dicom_port), "+sd", str(study)])
        return time.perf_counter() - start
    finally:
        peer.stop()


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--instances", type=int, default=300)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-", dir=REPO / "bench"))
    try:
        study = work / "study"
        files = ct_study(study, instances=args.instances)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        peers = {
            "passerelle": lambda d: PasserelleProcess(d / "data"),
            "orthanc": OrthancProcess,
            "bare pynetdicom SCP": BareScp,
            "pynetdicom SCP, no I/O": lambda d: BareScp(d, no_io=True),
        }
        seconds: dict[str, float] = {}
        for name, make_peer in peers.items():
            runs = [time_one_send(make_peer, work / "storage", study) for _ in range(args.repeat)]
            seconds[name] = statistics.median(runs)
            print(f"{name}: runs {', '.join(f'{r:.2f}s' for r in runs)}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ours = seconds["passerelle"]
    rows = [[name, f"{args.instances / s:.0f}", f"{megabytes / s:.0f}",
             f"{s / ours:.2f}x" if name != "passerelle" else "1.00x"]
            for name, s in seconds.items()]
    print(f"{args.instances} instances, {megabytes:.0f} MB, one association, "
          f"median of {args.repeat}")
    print(markdown_table(["peer", "instances/s", "MB/s", "passerelle speed-up"], rows))
    print(f"passerelle / orthanc: {seconds['orthanc'] / ours:.1f}x (target >= 10x)")
    print(f"passerelle / bare SCP: {seconds['bare pynetdicom SCP'] / ours:.2f}x (target >= 0.7x)")


if __name__ == "__main__":
    main()
