"""Ingest benchmark: dcmtk storescu into passerelle and Orthanc, same data, same run.

1. One association of a 300-instance 512x512 16-bit CT study (``--instances``), to
   passerelle (fsync durability on), to Orthanc + DICOMweb plugin (Debian packages,
   installed by the bench when missing), to a bare pynetdicom SCP that only writes the
   received bytes, to one that writes them durably (fsync of the file and its directory:
   the floor of a receiver whose success means on disk), and to a pynetdicom SCP that does
   nothing (the ceiling of any pynetdicom-based receiver).
2. Four associations at once, each a quarter of the same study: the aggregate rate beside
   the one-association rate of the same server (target for passerelle: >= 1.5x).
3. Small instances and Nagle's algorithm: 500 CT slices of 64x64 (``--small``), sent with
   storescu's default (no TCP_NODELAY: Nagle on, as most modalities) and with
   ``TCP_NODELAY=1`` in its environment (dcmtk then disables Nagle), to both servers
   (targets for passerelle: without >= 0.8x the rate with, and >= 5x Orthanc's without).

Every storescu runs without TCP_NODELAY in its environment unless said otherwise. Each
peer starts on a fresh storage folder for every repetition; only the storescu calls are
timed; the median is kept.

Usage: python bench/ingest.py [--repeat 3] [--instances 300] [--small 500]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import REPO, ct_study, install_bench_packages, markdown_table

from tests.orthanc import OrthancProcess
from tests.processes import PasserelleProcess, free_port, wait_for

MAX_PDU = 262144  # passerelle's default, used for the bare SCP too
ASSOCIATIONS = 4


class BareScp:
    """bench/bare_scp.py in a subprocess."""

    ae_title = "BARE"

    def __init__(self, folder: Path, option: str = "") -> None:
        self.folder = folder
        self.options = [option] if option else []
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


MakePeer = Callable[[Path], "PasserelleProcess | OrthancProcess | BareScp"]


def sender_environment(nodelay: bool) -> dict[str, str]:
    """storescu's environment: dcmtk disables Nagle's algorithm when TCP_NODELAY=1."""
    env = {name: value for name, value in os.environ.items() if name != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def time_sends(make_peer: MakePeer, storage: Path, folders: list[Path],
               nodelay: bool = False) -> float:
    """Start a fresh peer, time one storescu association per folder, all at once, until the
    last ends; stop the peer."""
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    peer = make_peer(storage).start()
    env = sender_environment(nodelay)
    try:
        start = time.perf_counter()
        senders = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", peer.ae_title,
                                     "127.0.0.1", str(peer.dicom_port), "+sd", str(folder)],
                                    env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
                   for folder in folders]
        failures = [(sender.wait(), sender.stderr.read() if sender.stderr else b"")
                    for sender in senders]
        elapsed = time.perf_counter() - start
        for code, stderr in failures:
            if code != 0:
                raise RuntimeError(f"storescu failed ({code}):\n{stderr.decode()[-2000:]}")
        return elapsed
    finally:
        peer.stop()


def median_run(label: str, make_peer: MakePeer, storage: Path, folders: list[Path],
               repeat: int, nodelay: bool = False) -> float:
    """Median seconds of ``repeat`` ``time_sends``; each run logged to stderr."""
    runs = [time_sends(make_peer, storage, folders, nodelay) for _ in range(repeat)]
    print(f"{label}: runs {', '.join(f'{r:.2f}s' for r in runs)}", file=sys.stderr)
    return statistics.median(runs)


def split(files: list[Path], folder: Path, count: int) -> list[Path]:
    """``files`` in ``count`` folders of about as many each (hard links)."""
    shutil.rmtree(folder, ignore_errors=True)
    parts = [folder / f"part{n}" for n in range(count)]
    for part in parts:
        part.mkdir(parents=True)
    for index, file in enumerate(files):
        (parts[index % count] / file.name).hardlink_to(file)
    return parts


def main() -> None:
    """Run the benchmark and print the tables."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--small", type=int, default=500, help="64x64 slices, Nagle test")
    args = parser.parse_args()
    install_bench_packages()

    servers: dict[str, MakePeer] = {"passerelle": lambda d: PasserelleProcess(d / "data"),
                                    "orthanc": OrthancProcess}
    peers: dict[str, MakePeer] = {
        **servers,
        "bare pynetdicom SCP": BareScp,
        "bare pynetdicom SCP, fsync": lambda d: BareScp(d, "--fsync"),
        "pynetdicom SCP, no I/O": lambda d: BareScp(d, "--no-io"),
    }
    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-", dir=REPO / "bench"))
    storage = work / "storage"
    try:
        study = work / "study"
        files = ct_study(study, instances=args.instances)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        one = {name: median_run(f"{name}, one association", make, storage, [study],
                                args.repeat) for name, make in peers.items()}
        quarters = split(files, work / "quarters", ASSOCIATIONS)
        four = {name: median_run(f"{name}, {ASSOCIATIONS} associations", make, storage,
                                 quarters, args.repeat) for name, make in servers.items()}
        small_study = work / "small"
        ct_study(small_study, instances=args.small, size=64)
        nagle = {(name, nodelay): median_run(
                    f"{name}, {args.small} 64x64, TCP_NODELAY={int(nodelay)}", make, storage,
                    [small_study], args.repeat, nodelay)
                 for name, make in servers.items() for nodelay in (False, True)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ours = one["passerelle"]
    print(f"\n{args.instances} instances, {megabytes:.0f} MB, one association, "
          f"median of {args.repeat}")
    print(markdown_table(
        ["peer", "instances/s", "MB/s", "passerelle speed-up"],
        [[name, f"{args.instances / s:.0f}", f"{megabytes / s:.0f}", f"{s / ours:.2f}x"]
         for name, s in one.items()]))
    print(f"passerelle / orthanc: {one['orthanc'] / ours:.1f}x (target >= 10x)")
    print(f"passerelle / bare SCP: {one['bare pynetdicom SCP'] / ours:.2f}x; "
          f"/ bare SCP with fsync: {one['bare pynetdicom SCP, fsync'] / ours:.2f}x; "
          f"/ SCP without I/O: {one['pynetdicom SCP, no I/O'] / ours:.2f}x")

    print(f"\nthe same study in {ASSOCIATIONS} associations at once "
          f"({args.instances // ASSOCIATIONS} instances each), median of {args.repeat}")
    print(markdown_table(
        ["server", "one association, instances/s", f"{ASSOCIATIONS} at once, instances/s",
         "aggregate / one"],
        [[name, f"{args.instances / one[name]:.0f}", f"{args.instances / s:.0f}",
          f"{one[name] / s:.2f}x"] for name, s in four.items()]))
    print(f"passerelle aggregate / one association: {one['passerelle'] / four['passerelle']:.2f}x"
          " (target >= 1.5x)")

    print(f"\n{args.small} CT slices of 64x64, one association, median of {args.repeat}")
    print(markdown_table(
        ["server", "TCP_NODELAY unset: s (ms/instance)", "TCP_NODELAY=1: s (ms/instance)",
         "rate unset / rate with"],
        [[name] + [f"{nagle[name, flag]:.2f} ({nagle[name, flag] / args.small * 1000:.1f})"
                   for flag in (False, True)]
         + [f"{nagle[name, True] / nagle[name, False]:.2f}x"] for name in servers]))
    without = nagle["passerelle", False]
    print(f"passerelle without TCP_NODELAY / with: {nagle['passerelle', True] / without:.2f}x "
          "the rate (target >= 0.8x)")
    print(f"passerelle / orthanc, without TCP_NODELAY: {nagle['orthanc', False] / without:.1f}x "
          "(target >= 5x)")


if __name__ == "__main__":
    main()
