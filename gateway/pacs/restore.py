"""Retrieval on demand: a study the index lists whose files are gone (its local copy removed
by retention, ``studies.copy_removed_at``, or simply lost) is retrieved again from the PACS
that holds it (``copy_held_by`` first, then every configured peer in order), so that what a
published manifest references stays available (IHE XDS-I.b: the Imaging Document Source
keeps the objects it references retrievable).

One retrieval per study at a time, across the service's processes: its retrieval holds an
exclusive ``flock`` on ``<data_dir>/restore-locks/<study>.lock``. A process that finds the
lock held waits for it, then finds the files back and retrieves nothing; a holder that dies
loses the lock with its descriptors, and the next waiter retrieves. Within a process, the
requests for one study share one job. The job runs in a thread of its own: a client that
stops waiting (``wait_seconds``) leaves it to finish, and a later request finds the files.
At most ``MAX_RESTORES`` studies are retrieved at once in a process: a request for another
one is answered at once as unavailable (clients asking for many studies would otherwise
start a thread and a PACS association each, and outlast their waits). A study whose
retrieval failed is not asked for again before the Retry-After its clients were given: each
request for a study the PACS cannot give back whole would otherwise retrieve all of it again.
"""

import fcntl
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway import metrics
from gateway.dicom.pacs_client import PacsError, retrieve_study
from gateway.pacs import PacsConfig
from storage.index import StoredInstance
from storage.store import Store
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)

MAX_RESTORES = 4  # studies retrieved on demand at once in one process


class RestoreUnavailableError(Exception):
    """The study is not here and could not be given back within the wait (the PACS is
    down, lacks it, or is slower than the wait); ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def printable(text: str, limit: int = 500) -> str:
    """``text`` with control characters replaced, at most ``limit`` characters: a peer's
    error comment goes into an HTTP body or a DIMSE Error Comment."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


@dataclass
class RestoreJob:
    """One study being retrieved in this process; ``error`` is set when it failed."""

    study_uid: str
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""


class Restorer:
    """Gives back the local copies of studies the configured PACS peers hold."""

    def __init__(self, config: PacsConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.lock_dir = config.data_dir / "restore-locks"
        self._jobs: dict[str, RestoreJob] = {}
        self._jobs_lock = threading.Lock()
        self._failed: dict[str, tuple[float, str]] = {}  # study -> (until, why), monotonic

    @property
    def enabled(self) -> bool:
        """Whether any PACS peer is configured (without one, nothing can be given back)."""
        return bool(self.config.peers)

    @property
    def retry_after(self) -> int:
        """Seconds a refused client is told to wait before it asks again."""
        return max(1, math.ceil(self.config.wait_seconds))

    def missing(self, instances: Iterable[StoredInstance]) -> list[StoredInstance]:
        """Those of ``instances`` whose file is not here."""
        return [i for i in instances if not self.store.blobs.absolute(i.path).is_file()]

    def start(self, study_uid: str) -> RestoreJob:
        """The job giving back ``study_uid``, started unless one runs in this process;
        RestoreUnavailableError when ``MAX_RESTORES`` others run, or when its retrieval
        failed less than ``retry_after`` seconds ago."""
        with self._jobs_lock:
            until, why = self._failed.get(study_uid, (0.0, ""))
            if time.monotonic() < until:
                metrics.RESTORE_WAITS.labels("unavailable").inc()
                raise RestoreUnavailableError(
                    f"study {study_uid} is not stored here and could not be retrieved from"
                    f" the PACS just now: {printable(why)}", self.retry_after)
            job = self._jobs.get(study_uid)
            if job is None and len(self._jobs) >= MAX_RESTORES:
                metrics.RESTORE_WAITS.labels("busy").inc()
                raise RestoreUnavailableError(
                    f"study {study_uid} is not stored here and {MAX_RESTORES} other studies"
                    " are being retrieved from the PACS: ask again later", self.retry_after)
            if job is None:
                job = self._jobs[study_uid] = RestoreJob(study_uid)
                threading.Thread(target=self._run, args=(job,), daemon=True,
                                 name=f"restore-{study_uid[-16:]}").start()
        return job

    def ensure_local(self, study_uid: str, wait: float | None = None) -> None:
        """Return once every indexed instance of ``study_uid`` has its file here, retrieving
        the study from the PACS when not; RestoreUnavailableError after ``wait`` seconds
        (default ``wait_seconds``) or when no peer gives it back. Blocking: for the DIMSE
        side (C-GET, C-MOVE SCP) and threads; the HTTP side polls ``start``'s job."""
        if not is_valid_uid(study_uid):
            raise ValueError(f"invalid study UID {study_uid[:80]!r}")
        if not self.missing(self.store.index.instances(study_uid)):
            return
        job = self.start(study_uid)
        self.outcome(job, job.done.wait(self.config.wait_seconds if wait is None else wait))

    def outcome(self, job: RestoreJob, finished: bool) -> None:
        """Count what the waiting client gets; RestoreUnavailableError unless restored."""
        if not finished:
            metrics.RESTORE_WAITS.labels("timeout").inc()
            raise RestoreUnavailableError(
                f"study {job.study_uid} is being retrieved from the PACS and was not back "
                f"within {self.config.wait_seconds:g} s: ask again later", self.retry_after)
        if job.error:
            metrics.RESTORE_WAITS.labels("unavailable").inc()
            raise RestoreUnavailableError(
                f"study {job.study_uid} is not stored here and could not be retrieved from "
                f"the PACS: {printable(job.error)}", self.retry_after)
        metrics.RESTORE_WAITS.labels("served").inc()

    def _run(self, job: RestoreJob) -> None:
        try:
            with self.study_lock(job.study_uid) as lock_path:
                if self.missing(self.store.index.instances(job.study_uid)):
                    self._retrieve(job.study_uid)
                else:  # another process gave it back while this one waited for the lock
                    metrics.RESTORES.labels("already_local").inc()
                self.store.index.copy_restored(job.study_uid)
                lock_path.unlink(missing_ok=True)
        except (PacsError, RestoreFailedError, OSError) as exc:
            job.error = str(exc)
            log.warning("on-demand retrieval of study %s failed: %s", job.study_uid, exc)
        except Exception as exc:  # a bug: the waiting clients still get an answer
            job.error = "internal error; the service log has details"
            log.exception("on-demand retrieval of study %s: %s", job.study_uid, exc)
        finally:
            with self._jobs_lock:
                self._jobs.pop(job.study_uid, None)
                now = time.monotonic()
                self._failed = {uid: failed for uid, failed in self._failed.items()
                                if failed[0] > now and uid != job.study_uid}
                if job.error:
                    self._failed[job.study_uid] = (now + self.retry_after, job.error)
            job.done.set()

    def study_lock(self, study_uid: str) -> "StudyLock":
        """The lock held while ``study_uid`` is retrieved (a context manager)."""
        return StudyLock(self.lock_dir / f"{study_uid}.lock")

    def _retrieve(self, study_uid: str) -> None:
        """Retrieve the study from the first peer that gives all of it back."""
        _, held_by = self.store.index.copy_state(study_uid)
        problems = []
        for peer in self.config.holders_first(held_by):
            log.info("study %s: local copy missing, retrieving it from %s by C-%s",
                     study_uid, peer.ae_title, peer.retrieve.upper())
            try:
                result = retrieve_study(peer, self.config.calling_ae, study_uid, self.store,
                                        timeout=self.config.timeout)
            except PacsError as exc:
                problems.append(str(exc))
                continue
            still = self.missing(self.store.index.instances(study_uid))
            if not still:
                metrics.RESTORES.labels("restored").inc()
                log.info("study %s given back by %s: %d instance(s) retrieved", study_uid,
                         peer.ae_title, result.completed)
                return
            problems.append(f"{peer.ae_title} gave back {result.completed} instance(s), "
                            f"{len(still)} still missing")
        metrics.RESTORES.labels("failed").inc()
        raise RestoreFailedError("; ".join(problems) or "no PACS peer configured")


class RestoreFailedError(Exception):
    """No peer gave the whole study back."""


class StudyLock:
    """An exclusive flock on ``path``, taken on the file the path names when it is held
    (a holder unlinks it once done: a waiter that locked the unlinked file tries again)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = self.path.stat().st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                self.fd = fd
                return self.path
            os.close(fd)

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)  # releases the lock
