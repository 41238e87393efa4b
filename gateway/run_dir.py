"""Where the processes of a service keep their run-time files: the metrics of every process
(prometheus_client's multiprocess mode) and the tallies of the shared budget.

Imported by ``gateway.cli`` before prometheus_client, which reads PROMETHEUS_MULTIPROC_DIR
once, at its first import: this module imports neither it nor the service.
"""

import os
import shutil
import socket
from pathlib import Path

from gateway.config import Settings


def run_dir_of(settings: Settings) -> Path:
    """``run/`` of the data dir; as a replica (which shares the data dir with others) a
    folder of its own there, named after its host and this (the supervisor's) pid."""
    run = settings.data_dir / "run"
    return run / f"{socket.gethostname()}-{os.getpid()}" if settings.is_replica() else run


def remove_stale_run_dirs(run_dir: Path) -> None:
    """Remove the run dirs beside ``run_dir`` of replicas of this host no longer running
    (those of other hosts are theirs to remove)."""
    for left in run_dir.parent.glob(f"{socket.gethostname()}-*"):
        if left != run_dir and not _running(left.name.rpartition("-")[2]):
            shutil.rmtree(left, ignore_errors=True)


def _running(pid: str) -> bool:
    """True when a process of this host has the pid ``pid``."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's
        return True
    return True
