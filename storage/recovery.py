"""Recovery after an unclean stop: bring the index back in line with the files.

Files are written atomically and fsynced before acknowledgement, the index commit on SQLite
is not fsynced (synchronous=NORMAL, see ``storage.database``); after a power cut the index
may therefore miss the last instances. Every file that is not indexed is re-indexed from its
header; a file that cannot be parsed (it cannot have been acknowledged) is moved to
``quarantine/``. Indexed instances whose file is gone are reported.
"""

import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from storage.blobs import BlobStore
from storage.header import read_header
from storage.index import IdentityConflictError, Index
from storage.structure import UnreadableDatasetError

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    """What a recovery pass found."""

    reindexed: int = 0
    quarantined: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many files of each kind: reindexed, quarantined, missing."""
        return {"reindexed": self.reindexed, "quarantined": len(self.quarantined),
                "missing": len(self.missing)}


def recover(blobs: BlobStore, index: Index) -> RecoveryReport:
    """Re-index unindexed files, quarantine unreadable ones, report missing files."""
    report = RecoveryReport()
    for study_dir in sorted(p for p in blobs.studies_dir.iterdir() if p.is_dir()):
        indexed = index.study_paths(study_dir.name)
        on_disk = {str(f.relative_to(blobs.root)) for f in study_dir.glob("*/*.dcm")}
        for relative in sorted(on_disk - indexed):
            # Indexed under another study: filed under the study it was sent in by versions
            # before v8 (reported by the index upgrade), not a file the index lost.
            if not index.has_path(relative):
                _reindex(blobs, index, relative, report)
        report.missing += sorted(p for p in indexed if not (blobs.root / p).exists())
    for relative in report.missing:
        log.error("indexed instance has no file: %s", relative)
    if report.reindexed or report.quarantined:
        log.warning("recovery: %d file(s) re-indexed, %d quarantined", report.reindexed,
                    len(report.quarantined))
    return report


def _reindex(blobs: BlobStore, index: Index, relative: str, report: RecoveryReport) -> None:
    path = blobs.absolute(relative)
    data = path.read_bytes()
    try:
        record = read_header(data)
        expected = blobs.relative_path(record.study_uid, record.series_uid, record.sop_uid)
        if expected != relative:
            raise UnreadableDatasetError(f"file content belongs at {expected}")
    except (UnreadableDatasetError, ValueError) as exc:
        _quarantine(blobs, relative, str(exc), report)
        return
    try:
        index.add_instance(record, relative, len(data), source="recovery")
    except IdentityConflictError as exc:  # never acknowledged: its ingest was refused
        _quarantine(blobs, relative, str(exc), report)
        return
    report.reindexed += 1


def _quarantine(blobs: BlobStore, relative: str, why: str, report: RecoveryReport) -> None:
    folder = blobs.root / "quarantine"
    folder.mkdir(exist_ok=True)
    target = _free_name(folder, Path(relative).name)
    blobs.absolute(relative).replace(target)
    log.error("quarantined %s as %s: %s", relative, target.relative_to(blobs.root), why)
    report.quarantined.append(relative)


def _free_name(folder: Path, name: str) -> Path:
    """``folder / name``, or with a numbered suffix when taken: the files of an identity
    conflict share their SOP Instance UID, hence their name, and none may overwrite another.
    Recovery runs alone (under the service lock), so a free name stays free."""
    target, number = folder / name, 0
    while target.exists():
        number += 1
        target = folder / f"{Path(name).stem}.{number}{Path(name).suffix}"
    return target


class DataDirBusyError(RuntimeError):
    """Another ``passerelle serve`` holds the data directory."""


class ServiceLock:
    """Exclusive claim of a data directory by one service process.

    The lock file says ``running`` while a service holds it and ``stopped`` after a clean
    stop, so the next claim knows whether the previous run ended uncleanly.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "serve.lock"
        self._fd: int | None = None
        self.previous_stop_was_clean = True

    def acquire(self) -> None:
        """Take the lock or raise DataDirBusyError; read how the previous run ended."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusyError(f"{self.path.parent} is used by another passerelle serve"
                                   ) from None
        self.previous_stop_was_clean = os.pread(fd, 16, 0) in (b"", b"stopped")
        self._fd = fd
        self._write(b"running")

    @staticmethod
    def is_held(data_dir: Path) -> bool:
        """True when a service holds the lock of ``data_dir`` now (nothing is written)."""
        try:
            fd = os.open(data_dir / "serve.lock", os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the shared lock just taken
        return False

    def release(self, clean: bool = True) -> None:
        """Record the stop (``clean``: the next claim need not check the index against the
        files) and release the lock."""
        if self._fd is not None:
            if clean:
                self._write(b"stopped")
            os.close(self._fd)
            self._fd = None

    def _write(self, state: bytes) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, state, 0)
        os.fsync(self._fd)
