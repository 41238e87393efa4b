"""Where the processes of a service keep their run-time files: the metrics of every process
(prometheus_client's multiprocess mode) and the tallies of the shared budget.

Imported by ``gateway.cli`` before prometheus_client, which reads PROMETHEUS_MULTIPROC_DIR
once, at its first import: this module imports neither it nor the service.
"""

import shutil
from pathlib import Path

from gateway.config import Settings


def run_dir_of(settings: Settings, service: str) -> Path:
    """``run/`` of the data dir; as a replica (which shares the data dir with others) a
    folder of its own there, named after ``service`` (the name of its replica lock,
    ``storage.recovery.ServiceLock``)."""
    run = settings.data_dir / "run"
    return run / service if settings.is_replica() else run


def remove_run_dirs(run_dir: Path, services: list[str]) -> None:
    """Remove the run dirs beside ``run_dir`` of ``services`` (replicas that died, whose
    locks this one took over: no process of theirs is left to use them)."""
    for service in services:
        shutil.rmtree(run_dir.parent / service, ignore_errors=True)
