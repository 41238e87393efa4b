"""Part 10 files laid out by study / series / instance UID, written atomically and durably.

Layout: ``<root>/studies/<study>/<series>/<instance>.dcm``, and the published KOS manifests
under ``<root>/manifests/<study>/<kos>.dcm``. A file only ever appears under
its final name complete and fsynced (temp file in ``<root>/tmp``, fsync, rename, fsync of
the directory), so a reader never sees a partial file and a power cut never loses one whose
``put`` returned.
"""

import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from storage.uids import is_valid_uid

_KNOWN_DIRS_LIMIT = 10_000


class InvalidUIDError(ValueError):
    """A UID that must not be used as a path component."""


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file created, renamed or deleted in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobTooLargeError(ValueError):
    """A temporary file would pass its limit."""


class TemporaryBlob:
    """A file being written at ``path``, at most ``limit`` bytes (None: no limit): it
    becomes a stored file through ``BlobStore.adopt``, or is deleted by ``discard``.
    Writes go straight to the file (no buffer): what was written is what a reader sees."""

    def __init__(self, path: Path, limit: int | None = None) -> None:
        self.path = path
        self.limit = limit
        self.size = 0
        self.adopted = False
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; BlobTooLargeError (nothing written) past ``limit``."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        if self.limit is not None and self.size + len(data) > self.limit:
            raise BlobTooLargeError(f"more than {self.limit} bytes")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.size += len(data)

    def sync_and_close(self) -> None:
        """Flush the file to stable storage and close it (what ``adopt`` needs first)."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                self.close()

    def close(self) -> None:
        """Close the file, keeping it (to be read, then adopted or discarded)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close and delete the file unless it was adopted; safe to call again."""
        self.close()
        if not self.adopted:
            self.path.unlink(missing_ok=True)


class BlobStore:
    """Durable file store of DICOM instances under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.studies_dir = root / "studies"
        self.tmp_dir = root / "tmp"
        self._known_dirs: set[Path] = set()  # directories known to exist durably
        self._dirs_lock = threading.Lock()
        for directory in (root, self.studies_dir, self.tmp_dir):
            self._make_dir_durable(directory)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Path of an instance relative to ``root``; raises InvalidUIDError for unsafe UIDs."""
        for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP Instance", sop_uid)):
            if not is_valid_uid(uid):
                raise InvalidUIDError(f"invalid {name} UID {uid[:80]!r}")
        return f"studies/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def manifest_path(self, study_uid: str, kos_uid: str) -> str:
        """Path of a study's published KOS manifest relative to ``root``."""
        for name, uid in (("Study", study_uid), ("KOS SOP Instance", kos_uid)):
            if not is_valid_uid(uid):
                raise InvalidUIDError(f"invalid {name} UID {uid[:80]!r}")
        return f"manifests/{study_uid}/{kos_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        """Absolute path of a stored file from its relative path."""
        return self.root / relative

    def temporary(self, limit: int | None = None) -> "TemporaryBlob":
        """A new temporary file in ``<root>/tmp`` (purged at start-up), to write then
        ``adopt`` or ``discard``; ``limit`` bytes at most."""
        return TemporaryBlob(self.tmp_dir / f"{uuid.uuid4().hex}.part", limit)

    def scratch(self) -> BinaryIO:
        """An anonymous read-write file in ``<root>/tmp``, gone once closed (or on a crash)."""
        return tempfile.TemporaryFile(dir=self.tmp_dir)

    def put(self, relative: str, chunks: Iterable[bytes]) -> None:
        """Write ``chunks`` as the file ``relative``, atomically replacing any previous one.

        Returns only once the data and the directory entry are on stable storage. On any
        error the temporary file is removed and the previous content, if any, is untouched.
        """
        blob = self.temporary()
        try:
            for chunk in chunks:
                blob.write(chunk)
        except BaseException:
            blob.discard()
            raise
        self.adopt(blob, relative)

    def adopt(self, blob: "TemporaryBlob", relative: str) -> None:
        """Make the complete temporary file ``blob`` the file ``relative``: fsynced, renamed
        over any previous one, its directory fsynced. On any error ``blob`` is discarded and
        the previous content, if any, is untouched."""
        target = self.root / relative
        try:
            self._make_dir_durable(target.parent)
            blob.sync_and_close()
            blob.path.replace(target)
        except BaseException:
            blob.discard()
            raise
        blob.adopted = True
        fsync_dir(target.parent)

    def read(self, relative: str) -> bytes:
        """Whole content of a stored file."""
        return (self.root / relative).read_bytes()

    def delete(self, relative: str) -> None:
        """Remove a stored file (missing is fine) and make the removal durable."""
        target = self.root / relative
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
            fsync_dir(target.parent)

    def purge_temporary(self, untouched_for: float = 0) -> int:
        """Delete temp files left by an interrupted write, only those not written to for
        ``untouched_for`` seconds when given; returns how many were removed."""
        removed, cutoff = 0, time.time() - untouched_for
        for leftover in self.tmp_dir.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if untouched_for and leftover.stat().st_mtime > cutoff:
                    continue
                leftover.unlink()
                removed += 1
        return removed

    def _make_dir_durable(self, directory: Path) -> None:
        """Create ``directory`` and missing parents, fsyncing each parent that gained an entry."""
        if directory in self._known_dirs:
            return
        with self._dirs_lock:
            missing: list[Path] = []
            probe = directory
            while not probe.is_dir():
                missing.append(probe)
                probe = probe.parent
            for new_dir in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    new_dir.mkdir()
                fsync_dir(new_dir.parent)
            if len(self._known_dirs) >= _KNOWN_DIRS_LIMIT:
                self._known_dirs.clear()
            self._known_dirs.add(directory)
