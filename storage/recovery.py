"""Recovery after an unclean stop: bring the index back in line with the files.

Files are written atomically and fsynced before acknowledgement, the index commit on SQLite
is not fsynced (synchronous=NORMAL, see ``storage.database``); after a power cut the index
may therefore miss the last instances. Every file that is not indexed is re-indexed from its
header; a file that cannot be parsed (it cannot have been acknowledged) is moved to
``quarantine/``. Indexed instances whose file is gone are reported, but for the studies
whose local copy retention removed.
"""

import fcntl
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from storage.blobs import BlobStore
from storage.header import read_header
from storage.index import IdentityConflictError, Index
from storage.local_copies import copy_removed
from storage.structure import UnreadableDatasetError

log = logging.getLogger(__name__)


def service_name() -> str:
    """A name for one run of a service, unique among replicas and runs: host, pid and a
    random part (a restart with a recycled pid, or a container with the same host name and
    pid, is another service)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


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
    """Re-index unindexed files, quarantine unreadable ones, report missing files. Replicas
    on one data dir recover one after the other (``recovery.lock``)."""
    fd = os.open(blobs.root / "recovery.lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _recover(blobs, index)
    finally:
        os.close(fd)


def _recover(blobs: BlobStore, index: Index) -> RecoveryReport:
    report = RecoveryReport()
    for study_dir in sorted(p for p in blobs.studies_dir.iterdir() if p.is_dir()):
        indexed = index.study_paths(study_dir.name)
        on_disk = {str(f.relative_to(blobs.root)) for f in study_dir.glob("*/*.dcm")}
        for relative in sorted(on_disk - indexed):
            # Indexed under another study: filed under the study it was sent in by versions
            # before v8 (reported by the index upgrade), not a file the index lost.
            if not index.has_path(relative):
                _reindex(blobs, index, relative, report)
        if not copy_removed(index, study_dir.name):  # its files are in a PACS (retention)
            report.missing += sorted(p for p in indexed if not (blobs.root / p).exists())
    for relative in report.missing:
        log.error("indexed instance has no file: %s", relative)
    if report.reindexed or report.quarantined:
        log.warning("recovery: %d file(s) re-indexed, %d quarantined", report.reindexed,
                    len(report.quarantined))
    return report


def _reindex(blobs: BlobStore, index: Index, relative: str, report: RecoveryReport) -> None:
    path = blobs.absolute(relative)
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # deleted by a live replica whose index write failed
        return
    try:
        record = read_header(data)
        expected = blobs.relative_path(record.study_uid, record.series_uid, record.sop_uid)
        if expected != relative:
            raise UnreadableDatasetError(f"file content belongs at {expected}")
    except (UnreadableDatasetError, ValueError) as exc:
        _quarantine(blobs, relative, str(exc), report)
        return
    # The lock of the instance's ingest (storage.store): a live replica may have renamed
    # this file into place and not yet committed it; once it has, the file is indexed, or
    # deleted when its index write failed.
    with index.database.lock(f"instance {record.sop_uid}"):
        if index.has_path(relative) or not path.exists():
            return
        if index.fetch("SELECT 1 FROM rejected_instances WHERE sop_uid = :sop_uid"
                       " AND note_uid != sop_uid", {"sop_uid": record.sop_uid}):
            # Rejected by an IOCM note (storage.rejections) while this file was written
            # back: never shown again.
            _quarantine(blobs, relative, "rejected by an IOCM rejection note", report)
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
    Recovery runs alone (``recovery.lock``), so a free name stays free."""
    target, number = folder / name, 0
    while target.exists():
        number += 1
        target = folder / f"{Path(name).stem}.{number}{Path(name).suffix}"
    return target


def _still_named(path: Path, fd: int) -> bool:
    """True when ``path`` is still the name of the file open as ``fd``."""
    try:
        return path.stat().st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class DataDirBusyError(RuntimeError):
    """Another ``passerelle serve`` holds the data directory."""


_LOCK_FILE = "serve.lock"
_REPLICAS_DIR = "replicas"
# A replica purges only the temporary files no write touched for this long: younger ones
# may be another replica's receptions in flight (their silence timeouts are far shorter).
_REPLICA_TEMPORARY_AGE_S = 3600


class ServiceLock:
    """A service process's claim of its data directory.

    Alone (its index the SQLite file of the data dir): an exclusive lock of ``serve.lock``,
    which says ``running`` while held and ``stopped`` after a clean stop, so the next claim
    knows whether the previous run ended uncleanly.

    A replica (an index shared with other services, on PostgreSQL): a shared lock of
    ``serve.lock`` (replicas run side by side, a service with its own SQLite index cannot
    join them, nor they it) and an exclusive lock of a file of its own,
    ``replicas/<name>.lock``, removed at a clean stop. A file left there and no longer
    locked is a replica that died: the replica that locks it next checks the files
    (``previous_stop_was_clean`` False), lists its name in ``gone`` and removes it at its
    own clean stop. Two replicas starting at once never take the same one; were both to
    recover anyway, the index writes of recovery are idempotent (one row per SOP Instance
    UID). Which replicas are gone is known by their locks, never by a process id: replicas
    in containers may share a host name and a pid.
    """

    def __init__(self, data_dir: Path, replica: bool = False, name: str = "",
                 index_file: Path | None = None) -> None:
        self.path = data_dir / _LOCK_FILE
        self.replica = replica
        # Alone on an SQLite file, which another data dir's service could name too: that
        # file is claimed as well (``<file>.serve-lock``), or both would publish its rows.
        self._index_lock = None if index_file is None else \
            index_file.with_name(f"{index_file.name}.serve-lock")
        self._index_fd: int | None = None
        self.name = name or service_name()  # this service among the replicas
        self.gone: list[str] = []  # replica: the names of the dead replicas taken over
        self._fd: int | None = None
        self._own: list[tuple[Path, int]] = []  # replica: its file, then dead ones taken over
        self.previous_stop_was_clean = True

    def acquire(self) -> None:
        """Take the lock or raise DataDirBusyError; read how the previous run ended."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.replica else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusyError(
                f"{self.path.parent} is used by another passerelle serve"
                + (" with its own SQLite index: replicas share a PostgreSQL database_url"
                   if self.replica else "")) from None
        self._fd = fd
        if self._index_lock is not None:
            self._claim_index()
        if self.replica:
            self._join_replicas()
        else:
            self.previous_stop_was_clean = os.pread(fd, 16, 0) in (b"", b"stopped")
            self._write(b"running")

    def _claim_index(self) -> None:
        assert self._index_lock is not None
        fd = os.open(self._index_lock, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.release(clean=False)
            raise DataDirBusyError(f"the index {self._index_lock.with_suffix('')} is used by "
                                   "another passerelle serve") from None
        self._index_fd = fd

    def _join_replicas(self) -> None:
        folder = self.path.parent / _REPLICAS_DIR
        folder.mkdir(exist_ok=True)
        for path in sorted(folder.glob("*.lock")):
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # removed by the replica that stopped cleanly
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live replica, or one being taken over by another
                os.close(fd)
                continue
            if not _still_named(path, fd):  # removed by a clean stop since it was opened
                os.close(fd)
                continue
            self._own.append((path, fd))
            self.gone.append(path.stem)
            self.previous_stop_was_clean = False
        mine = folder / f"{self.name}.lock"
        fd = os.open(mine, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._own.insert(0, (mine, fd))

    def purge_temporary(self, blobs: BlobStore) -> int:
        """Delete the temporary files of interrupted writes (only the lock holder may: an
        import beside the service has its own in flight); a replica only those untouched
        for an hour. How many were removed."""
        return blobs.purge_temporary(_REPLICA_TEMPORARY_AGE_S if self.replica else 0)

    @staticmethod
    def is_held(data_dir: Path) -> bool:
        """True when a service holds the lock of ``data_dir`` now, alone or as a replica
        (nothing is written)."""
        try:
            fd = os.open(data_dir / _LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the lock just taken
        return False

    def release(self, clean: bool = True) -> None:
        """Record the stop (``clean``: the next claim need not check the index against the
        files) and release the lock."""
        for path, fd in self._own:
            if clean:  # removed while locked: no replica takes it for a dead one
                path.unlink(missing_ok=True)
            os.close(fd)
        self._own = []
        if self._index_fd is not None:
            os.close(self._index_fd)
            self._index_fd = None
        if self._fd is not None:
            if clean and not self.replica:
                self._write(b"stopped")
            os.close(self._fd)
            self._fd = None

    def _write(self, state: bytes) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, state, 0)
        os.fsync(self._fd)
