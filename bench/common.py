"""Shared pieces of the benchmarks: timing, tables, the synthetic CT study."""

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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


def run_checked(command: list[str]) -> None:
    """Run a command, raising with its output if it fails."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stderr[-2000:]}")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, ready to paste into the README."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
