"""The local copies of stored studies: which studies have their files here, when each was
last read, and removing the files of one that a PACS holds (gateway.pacs.retention decides
which). The index rows stay: the study is still published and served, its instances
retrieved again from the PACS (``copy_held_by``) when asked for.

A removal is marked first, then the files go: ``copy_removed_at`` and ``copy_held_by`` are
set (only if the study is unchanged since its copy was confirmed), then each file is deleted
under its instance's lock. A crash between leaves a study marked with some files still
here: those are served as they are, the missing ones are retrieved from the peer the mark
names, and the next pass deletes the rest. The other order could leave files gone and no
mark: nothing would say that a PACS holds them, nor which.
"""

from dataclasses import dataclass

from sqlalchemy import text

from storage.blobs import BlobStore
from storage.index import Index

# Instances an IOCM rejection note removed are not part of the copy a PACS must hold.
_NOT_REJECTED = "i.sop_uid NOT IN (SELECT sop_uid FROM rejected_instances)"
_OF_STUDY = "FROM instances i JOIN series se ON i.series_pk = se.pk WHERE se.study_pk = st.pk"
_STUDIES = f"""
    SELECT st.study_uid, st.last_received_at,
        (SELECT max(a.last_at) FROM study_accesses a WHERE a.study_pk = st.pk),
        st.changes, st.queued_changes, st.copy_removed_at, st.copy_held_by,
        (SELECT count(*) {_OF_STUDY} AND {_NOT_REJECTED}),
        (SELECT COALESCE(sum(i.size), 0) {_OF_STUDY} AND {_NOT_REJECTED}),
        (SELECT p.state FROM publications p WHERE p.study_uid = st.study_uid
         AND p.state IN ('pending', 'sent', 'failed') ORDER BY p.pk LIMIT 1)
    FROM studies st"""
# Conditional on what was read when the copy was confirmed: an instance received since
# (``changes``) or another remover's mark (a replica, the command) leaves it unmarked.
_MARK = text("""
    UPDATE studies SET copy_removed_at = :now, copy_held_by = :held_by
    WHERE study_uid = :study_uid AND changes = :changes
    AND COALESCE(copy_removed_at, -1) = :removed_at
    RETURNING pk""")


@dataclass(frozen=True, slots=True)
class StudyCopy:
    """A stored study as retention sees it; times in seconds since the epoch."""

    study_uid: str
    last_received_at: float
    last_access: float  # the newest of its last reception and its last access
    changes: int  # instances written into it (storage.outbox)
    queued: bool  # queued for publication since its last change (stable)
    copy_removed_at: float | None  # None while its files are here
    copy_held_by: str
    instances: int  # indexed and not rejected
    size: int  # their bytes, as indexed
    unfinished: str  # state of its oldest publication not acknowledged ("" when none)


@dataclass(frozen=True, slots=True)
class LocalInstance:
    """One instance of a study whose file a removal deletes."""

    sop_uid: str
    series_uid: str
    path: str  # relative to the data dir
    received_at: float  # changes when the object is replaced


@dataclass(frozen=True, slots=True)
class Removal:
    """What a removal deleted: files and their bytes."""

    instances: int
    size: int


class StudyChangedError(Exception):
    """The study changed since its copy was confirmed: nothing was removed."""


def copy_removed(index: Index, study_uid: str) -> bool:
    """True when the study's local copy was removed (its missing files are expected)."""
    return bool(index.fetch("SELECT 1 FROM studies WHERE study_uid = :study_uid"
                            " AND copy_removed_at IS NOT NULL", {"study_uid": study_uid}))


def _copy(row: tuple) -> StudyCopy:
    (study_uid, received, accessed, changes, queued_changes, removed_at, held_by, count,
     size, unfinished) = row
    return StudyCopy(study_uid, received, max(received, accessed or 0), changes,
                     queued_changes == changes, removed_at, held_by, count, int(size),
                     unfinished or "")


class LocalCopies:
    """The local copies of the studies of one index and blob store."""

    def __init__(self, index: Index, blobs: BlobStore) -> None:
        self.index = index
        self.blobs = blobs

    def studies(self) -> list[StudyCopy]:
        """Every stored study, the least recently accessed first."""
        return sorted((_copy(row) for row in self.index.fetch(_STUDIES)),
                      key=lambda copy: (copy.last_access, copy.study_uid))

    def study(self, study_uid: str) -> StudyCopy | None:
        """One stored study, None when unknown."""
        rows = self.index.fetch(_STUDIES + " WHERE st.study_uid = :study_uid",
                                {"study_uid": study_uid})
        return _copy(rows[0]) if rows else None

    def has_files(self, copy: StudyCopy) -> bool:
        """True when some file a removal deletes is here: it was never removed, or a
        removal was interrupted, or instances were retrieved or received again since. The
        files of what ``instances`` leaves out (a rejection note's own) never count: they
        would have the study removed again at every pass."""
        if copy.copy_removed_at is None:
            return True
        return any(self.blobs.absolute(instance.path).is_file()
                   for instance in self.instances(copy.study_uid))

    def instances(self, study_uid: str) -> list[LocalInstance]:
        """The instances of a study a PACS must hold before its copy goes: every indexed
        one but those an IOCM rejection note removed."""
        return [LocalInstance(*row) for row in self.index.fetch(
            f"""SELECT i.sop_uid, se.series_uid, i.path, i.received_at
                FROM instances i JOIN series se ON i.series_pk = se.pk
                JOIN studies st ON se.study_pk = st.pk
                WHERE st.study_uid = :study_uid AND {_NOT_REJECTED}
                ORDER BY i.pk""", {"study_uid": study_uid})]

    def remove(self, copy: StudyCopy, held_by: str, instances: list[LocalInstance]) -> Removal:
        """Mark the study's copy removed, held by ``held_by``, then delete the files of
        ``instances`` (those the peer was confirmed to hold). StudyChangedError, nothing
        done, when the study changed since ``copy`` was read. An instance replaced since
        it was read keeps its file (the peer holds the object it replaced); OSError from a
        deletion leaves the study marked, its remaining files for the next pass."""
        with self.index.transaction() as db:
            marked = db.execute(_MARK, {
                "now": self.index.database.now(db), "held_by": held_by,
                "study_uid": copy.study_uid, "changes": copy.changes,
                "removed_at": -1 if copy.copy_removed_at is None else copy.copy_removed_at,
            }).first()
        if marked is None:
            raise StudyChangedError(f"study {copy.study_uid} changed while its copy was"
                                    " checked")
        count = size = 0
        for instance in instances:
            # The lock of the instance's ingest (storage.store): a replacement is either
            # committed before this reads its row, or written after this deleted the file.
            with self.index.database.lock(f"instance {instance.sop_uid}"):
                now = self.index.find_instance(instance.sop_uid)
                if now is None or (now.path, now.received_at) != (instance.path,
                                                                  instance.received_at):
                    continue
                try:
                    bytes_here = self.blobs.absolute(instance.path).stat().st_size
                except FileNotFoundError:
                    continue
                self.blobs.delete(instance.path)
            count += 1
            size += bytes_here
        return Removal(count, size)
