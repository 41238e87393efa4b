"""Shared pieces of the benchmarks: timing, tables, the synthetic CT study, the Debian
packages of the peers."""

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.synthetic import write_ct_study  # noqa: E402


def ct_study(folder: Path, instances: int = 300, size: int = 512) -> list[Path]:
    """The benchmark study: one series of ``instances`` 16-bit CT slices (cached on disk)."""
    existing = sorted(folder.glob("*.dcm"))
    if len(existing) == instances:
        return existing
    for old in existing:
        old.unlink()
    return write_ct_study(folder, series=1, per_series=instances, size=size)


def median_seconds(run: Callable[[], None], repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``run``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_checked(command: list[str], env: Mapping[str, str] | None = None) -> None:
    """Run a command (in ``env``, else this environment), raising with its output if it
    fails."""
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env=None if env is None else dict(env))
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stderr[-2000:]}")


# Debian package -> a file it installs: the peers and tools the benchmarks run.
BENCH_PACKAGES = {"orthanc": "/usr/sbin/Orthanc",
                  "orthanc-dicomweb": "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                  "dcmtk": "/usr/bin/storescu", "curl": "/usr/bin/curl"}


def install_bench_packages() -> None:
    """apt-get install the packages of ``BENCH_PACKAGES`` that are missing (as root, or
    through sudo); nothing when all are there. Orthanc's own service is not used: each
    benchmark starts Orthanc on its own ports (tests/orthanc.py)."""
    missing = [name for name, path in BENCH_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if sudo and shutil.which("sudo") is None:
        raise RuntimeError(f"missing Debian packages: apt-get install {' '.join(missing)}")
    print(f"installing {', '.join(missing)} with apt-get...", file=sys.stderr)
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_checked([*sudo, "apt-get", "update", "-qq"], apt_env)
    run_checked([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 *missing], apt_env)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, ready to paste into the README."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
