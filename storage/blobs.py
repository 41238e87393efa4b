"""Part 10 files laid out by study / series / instance UID, written atomically and durably.

Layout: ``<root>/studies/<study>/<series>/<instance>.dcm``, and the published KOS manifests
under ``<root>/manifests/<study>/<kos>.dcm``. A file only ever appears under
its final name complete and fsynced (temp file in ``<root>/tmp``, fsync, rename, fsync of
the directory), so a reader never sees a partial file and a power cut never loses one whose
``put`` returned.
"""

import contextlib
import os
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

from storage.uids import is_valid_uid

_KNOWN_DIRS_LIMIT = 10_000


class InvalidUIDError(ValueError):
    """A UID that must not be used as a path component."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def temporary_path(self) -> Path:
        """A new name for a temporary file, in ``<root>/tmp`` (purged at start-up)."""
        return self.tmp_dir / f"{uuid.uuid4().hex}.part"

    def put(self, relative: str, chunks: Iterable[bytes]) -> None:
        """Write ``chunks`` as the file ``relative``, atomically replacing any previous one.

        Returns only once the data and the directory entry are on stable storage. On any
        error the temporary file is removed and the previous content, if any, is untouched.
        """
        tmp = self.temporary_path()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self.adopt(tmp, relative)

    def adopt(self, tmp: Path, relative: str) -> None:
        """Make the complete temporary file ``tmp`` the file ``relative``, as ``put`` does:
        fsynced, renamed over any previous one, its directory fsynced. On any error ``tmp``
        is removed and the previous content, if any, is untouched."""
        target = self.root / relative
        try:
            self._make_dir_durable(target.parent)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(target.parent)

    def read(self, relative: str) -> bytes:
        """Whole content of a stored file."""
        return (self.root / relative).read_bytes()

    def delete(self, relative: str) -> None:
        """Remove a stored file (missing is fine) and make the removal durable."""
        target = self.root / relative
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
            _fsync_dir(target.parent)

    def purge_temporary(self) -> int:
        """Delete temp files left by an interrupted write; returns how many were removed."""
        removed = 0
        for leftover in self.tmp_dir.glob("*.part"):
            leftover.unlink(missing_ok=True)
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
                _fsync_dir(new_dir.parent)
            if len(self._known_dirs) >= _KNOWN_DIRS_LIMIT:
                self._known_dirs.clear()
            self._known_dirs.add(directory)
