"""Stored instance files opened for a response, read in large chunks.

A response that announces its Content-Length must send exactly that many bytes, yet a stored
file may be replaced (``duplicate_policy = "replace"`` renames the new file over it) or
deleted while the response is computed or sent. A file opened before the length is computed
keeps the bytes measured: an open file outlives its rename or unlink. The descriptors held
that way, across the process, are bounded (``DescriptorBudget``); a response that finds no
room opens each file as it comes and is sent chunked.

A file the index lists but which is not here (a local copy removed while a PACS holds it)
is retrieved again before the response is computed (``ensure_local``, gateway.pacs.restore).
"""

import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request

from gateway.pacs.restore import RestoreUnavailableError
from gateway.web.services import services_of
from storage.index import StoredInstance

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
# Of the process's soft RLIMIT_NOFILE, the share that responses may hold open at once (the
# rest is for sockets, the index, the received files).
_HELD_SHARE = 4
_WITHOUT_RLIMIT = 256  # where the resource module does not exist
_RESTORE_POLL_SECONDS = 0.05


class FileChangedError(OSError):
    """A stored file that ended before the size measured when it was opened."""


@dataclass(slots=True)
class OpenedFile:
    """One stored file, open for reading from its start: ``size`` bytes, as measured."""

    fd: int
    size: int
    name: str

    def close(self) -> None:
        """Close the descriptor (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_file(path: Path) -> OpenedFile:
    """``path`` opened and measured (FileNotFoundError once deleted)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, size, path.name)


async def chunks(opened: OpenedFile) -> AsyncIterator[bytes]:
    """The ``opened.size`` bytes of the file, ``READ_CHUNK`` at a time, each read in a
    worker thread; FileChangedError if it ends before (truncated in place: the response
    is cut, never framed wrong)."""
    left = opened.size
    while left:
        chunk = await run_in_threadpool(os.read, opened.fd, min(left, READ_CHUNK))
        if not chunk:
            raise FileChangedError(f"{opened.name} ended {left} bytes before its measured "
                                   f"size {opened.size}")
        left -= len(chunk)
        yield chunk


class DescriptorBudget:
    """How many descriptors responses may hold open at once, across the process: a share of
    the open-file limit, read at first use (the supervisor raises the limit after this
    module is imported), unless ``capacity`` is given."""

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None:
            self.capacity = capacity
        self._held = 0
        self._lock = threading.Lock()

    @functools.cached_property
    def capacity(self) -> int:
        """How many may be held at once."""
        return _capacity()

    def take(self, count: int) -> bool:
        """Hold ``count`` more, if there is room; False if not (nothing held)."""
        with self._lock:
            if self._held + count > self.capacity:
                return False
            self._held += count
            return True

    def give_back(self, count: int) -> None:
        """Release ``count`` held."""
        with self._lock:
            self._held -= count


def _capacity() -> int:
    try:
        import resource
    except ImportError:  # not a Unix
        return _WITHOUT_RLIMIT
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _WITHOUT_RLIMIT * _HELD_SHARE if soft == resource.RLIM_INFINITY \
        else soft // _HELD_SHARE


DESCRIPTORS = DescriptorBudget()


class HeldFiles:
    """Files opened together for one response, ``taken`` descriptors of ``budget`` held for
    them; ``close()`` closes those still open and gives the room back (once)."""

    def __init__(self, files: dict[str, OpenedFile], budget: DescriptorBudget,
                 taken: int) -> None:
        self.files = files
        self._budget = budget
        self._count = taken

    def close(self) -> None:
        """Close every file, give the room back."""
        for opened in self.files.values():
            opened.close()
        self._budget.give_back(self._count)
        self._count = 0


def hold_files(paths: dict[str, Path], budget: DescriptorBudget = DESCRIPTORS
               ) -> HeldFiles | None:
    """Each of ``paths`` (by key) opened and measured, those deleted meanwhile left out
    (logged); None, nothing opened, when ``budget`` has no room for them all. Blocking:
    call from a worker thread."""
    if not budget.take(len(paths)):
        return None
    files: dict[str, OpenedFile] = {}
    held = HeldFiles(files, budget, len(paths))
    try:
        for key, path in paths.items():
            try:
                files[key] = open_file(path)
            except FileNotFoundError:
                log.warning("%s was deleted before it could be sent", path)
    except BaseException:
        held.close()
        raise
    return held


async def ensure_local(request: Request, instances: list[StoredInstance]) -> bool:
    """Whether files of ``instances`` were missing and have been retrieved from a PACS (the
    caller reads their rows again: the syntax may be another); HTTPException 503 with
    Retry-After when they are not back within retrieve_wait_seconds. The wait polls the
    retrieval's job: a waiting request holds no worker thread."""
    restorer = services_of(request).restorer
    if not instances or not restorer.enabled:
        return False
    missing = await run_in_threadpool(restorer.missing, instances)
    for study_uid in sorted({instance.study_uid for instance in missing}):
        try:
            job = restorer.start(study_uid)
            deadline = time.monotonic() + restorer.config.wait_seconds
            while not job.done.is_set() and time.monotonic() < deadline:
                await anyio.sleep(_RESTORE_POLL_SECONDS)
            restorer.outcome(job, job.done.is_set())
        except RestoreUnavailableError as exc:
            log.warning("%s %s: 503, %s", request.method, request.url.path, exc)
            raise HTTPException(503, str(exc),
                                headers={"Retry-After": str(exc.retry_after)}) from None
    return bool(missing)
