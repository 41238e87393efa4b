"""The ingest path shared by C-STORE, STOW-RS and ``passerelle import``.

``Store.ingest`` takes one Part 10 file as bytes, ``Store.ingest_file`` as a temporary file
of the blob store (a C-STORE data set or a STOW-RS part streamed to disk, written through
``IncomingFile`` when it may lack its preamble), and either stores it durably (file
fsynced, index committed) or rejects it leaving nothing behind. Both first bound it by the
ingest limits: its size (a deflated data set also once inflated, as a stream), then the
structure of its data set, walked before anything parses it. Callers turn the outcome into a
DIMSE status, an HTTP answer or a line of the import summary.
"""

import enum
import errno
import io
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from storage.blobs import BlobStore, BlobTooLargeError, InvalidUIDError, TemporaryBlob
from storage.database import Database
from storage.database import database_url as url_of_index
from storage.header import InstanceRecord, read_header
from storage.index import IdentityConflict, IdentityConflictError, Index, StoredInstance
from storage.part10 import is_part10, read_file_meta, with_preamble
from storage.rejections import AppliedRejection, Rejections
from storage.sameness import FixedBudget, MemoryBudget, NotComparableError, same_instance
from storage.structure import (
    DatasetTooComplexError,
    DatasetTooLargeError,
    IngestLimits,
    UnreadableDatasetError,
)

log = logging.getLogger(__name__)

# Memory a process without the service's decode budget (``passerelle import``) may hold to
# compare a re-sent instance with the stored one: the service's default decode_memory_bytes.
_OWN_COMPARISON_BYTES = 512 << 20


class DuplicatePolicy(enum.StrEnum):
    """What to do when an instance arrives again under a stored SOP Instance UID."""

    KEEP_FIRST = "keep-first"
    OVERWRITE = "overwrite"


class Outcome(enum.StrEnum):
    """How an ingest ended."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same data set: nothing to do
    CONFLICT = "conflict"  # same SOP Instance UID, different data set: replaced (overwrite)
    REJECTED = "rejected"  # invalid input: nothing stored
    OUT_OF_RESOURCES = "out-of-resources"  # disk full or I/O error: nothing stored


class Rejection(enum.StrEnum):
    """Why an input was rejected; also the metric label."""

    NOT_PART10 = "not-part10"
    UNREADABLE = "unreadable"
    MISSING_UID = "missing-uid"
    INVALID_UID = "invalid-uid"
    UID_MISMATCH = "uid-mismatch"
    TOO_LARGE = "too-large"  # over max_instance_bytes
    TOO_COMPLEX = "too-complex"  # over max_sequence_items, _depth or max_dataset_elements
    DISK_FULL = "disk-full"
    IO_ERROR = "io-error"
    # The index knows the instance otherwise (PS3.4 B.2.2: success means stored, so a
    # conflict is never one). SOP Instance UID stored with another data set (keep-first)
    # or in another series or study (any policy):
    SOP_INSTANCE_CONFLICT = "sop-instance-conflict"
    STUDY_OF_OTHER_PATIENT = "study-of-other-patient"  # another Patient ID or issuer
    SERIES_OF_OTHER_STUDY = "series-of-other-study"
    # IHE IOCM (storage.rejections): an instance a rejection note took out of use, sent
    # again; a rejection note naming what is not of its study, or nothing it can reject.
    PREVIOUSLY_REJECTED = "previously-rejected"
    REJECTION_NOTE_OUTSIDE_STUDY = "rejection-note-outside-study"
    REJECTION_NOTE_INVALID = "rejection-note-invalid"


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What happened to one input, with a message fit for a peer or an operator."""

    outcome: Outcome
    message: str = ""
    reason: Rejection | None = None
    record: InstanceRecord | None = None
    replaced: bool = False  # a conflicting instance was overwritten
    offending: str = ""  # keyword of the attribute a rejection is about (0000,0901)

    @property
    def accepted(self) -> bool:
        """True when the instance is (now or already) safely stored."""
        return self.outcome in (Outcome.STORED, Outcome.DUPLICATE, Outcome.CONFLICT)


def _rejected(reason: Rejection, message: str, record: InstanceRecord | None = None,
              offending: str = "") -> IngestResult:
    outcome = (Outcome.OUT_OF_RESOURCES if reason in (Rejection.DISK_FULL, Rejection.IO_ERROR)
               else Outcome.REJECTED)
    return IngestResult(outcome, message, reason, record, offending=offending)


_CONFLICT_REASONS = {"SOPInstanceUID": Rejection.SOP_INSTANCE_CONFLICT,
                     "PatientID": Rejection.STUDY_OF_OTHER_PATIENT,
                     "SeriesInstanceUID": Rejection.SERIES_OF_OTHER_STUDY}


def _refused(conflict: IdentityConflict, record: InstanceRecord) -> IngestResult:
    return _rejected(_CONFLICT_REASONS[conflict.keyword], conflict.message, record,
                     conflict.keyword)


def too_large(limit: int) -> IngestResult:
    """The rejection of an instance over ``limit`` bytes (max_instance_bytes)."""
    return _rejected(Rejection.TOO_LARGE, f"larger than {limit} bytes (max_instance_bytes)")


def io_failure(error: OSError, record: InstanceRecord | None = None) -> IngestResult:
    """The rejection for an error writing an instance."""
    if error.errno == errno.ENOSPC:
        return _rejected(Rejection.DISK_FULL, "out of disk space", record)
    return _rejected(Rejection.IO_ERROR, f"I/O error: {error.strerror or error}", record)


_COMPARE_CHUNK = 1 << 20


def _size(source: bytes | Path) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def _open(source: bytes | Path) -> BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")


def _same_dataset(a: bytes | Path, b: bytes | Path) -> bool:
    """True when two Part 10 files hold the same encoded data set (their meta may differ)."""
    with _open(a) as left, _open(b) as right:
        read_file_meta(left)
        read_file_meta(right)
        while True:
            chunk = left.read(_COMPARE_CHUNK)
            if chunk != right.read(_COMPARE_CHUNK):
                return False
            if not chunk:
                return True


_PREFIX_BYTES = 132  # preamble and "DICM" (PS3.10 7.1)


class IncomingFile:
    """A Part 10 file received a chunk at a time into ``blob`` (from ``blobs.temporary``),
    read as ``Store.ingest`` reads bytes: a file meta group without the preamble and prefix
    gets them (``with_preamble``). Only its first 132 bytes are ever held."""

    def __init__(self, blob: TemporaryBlob) -> None:
        self.blob = blob
        self._head: bytes | None = b""  # None once written

    def write(self, data: bytes) -> None:
        """Append ``data``; BlobTooLargeError past the blob's limit, OSError."""
        if self._head is not None:
            self._head += data
            if len(self._head) < _PREFIX_BYTES:
                return
            data = self._take_head()
        self.blob.write(data)

    def complete(self) -> TemporaryBlob:
        """The whole file, for ``Store.ingest_file`` (which rejects what is not Part 10)."""
        if self._head is not None:
            self.blob.write(self._take_head())
        return self.blob

    def _take_head(self) -> bytes:
        head, self._head = self._head or b"", None
        return with_preamble(head) or head


class Store:
    """Files plus index under one data directory."""

    def __init__(self, data_dir: Path,
                 duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST,
                 limits: IngestLimits | None = None,
                 decode_memory: MemoryBudget | None = None, database_url: str = "") -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(data_dir)
        # The SQLite file of the data dir, or the database of PASSERELLE_DATABASE_URL.
        self.index = Index(Database(url_of_index(database_url, data_dir)))
        self.duplicate_policy = duplicate_policy
        self.limits = limits or IngestLimits()
        # Where comparing a re-sent instance decoded takes its memory from (the service sets
        # its decode memory budget here).
        self.decode_memory: MemoryBudget = decode_memory or FixedBudget(_OWN_COMPARISON_BYTES)
        self._read_patient_modules()
        self.rejections = Rejections(self.index, self.blobs, self.limits)
        self.rejections.settle()
        # Told of each rejection note applied (the service audits and counts them).
        self.on_rejection: Callable[[AppliedRejection], None] | None = None

    def _read_patient_modules(self) -> None:
        """Once after the v8 migration: the patient module of each study read again from
        the file of its first instance, or the next one when that is unreadable (earlier
        versions showed every study of a Patient ID with the demographics of the first
        study received)."""
        for study_uid, paths in self.index.patient_modules_to_read():
            record = None
            for path in paths:
                try:
                    found = read_header(self.blobs.absolute(path), self.limits,
                                        self.blobs.scratch)
                except (OSError, UnreadableDatasetError, DatasetTooLargeError,
                        DatasetTooComplexError) as exc:
                    log.warning("study %s: %s unreadable (%s), its patient module read from"
                                " the next instance", study_uid, path, exc)
                    continue
                if found.study_uid == study_uid:  # not a truncated file read as empty
                    record = found
                    break
                log.warning("study %s: %s holds no instance of it, its patient module read"
                            " from the next instance", study_uid, path)
            if record is None:
                log.warning("study %s keeps the patient module it was shown with: none of"
                            " its %d instance(s) is readable", study_uid, len(paths))
            self.index.set_patient_module(study_uid, record)

    def close(self) -> None:
        """Release the index."""
        self.index.close()

    def ingest(self, data: bytes, source: str,
               expected: Mapping[str, str] | None = None) -> IngestResult:
        """Store one Part 10 file given as bytes; ``source`` names the sender for the index.

        ``expected`` maps UID keywords (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
        SOPClassUID) to the value a protocol announced for the object (C-STORE's Affected
        SOP Instance UID, the study of a STOW-RS URL); a data set that disagrees is rejected.
        """
        normalised = with_preamble(data)
        if normalised is None:
            return _rejected(Rejection.NOT_PART10,
                             "not a DICOM Part 10 file (no 'DICM' prefix after the preamble)")
        return self._ingest(normalised, source, expected or {})

    def ingest_file(self, blob: TemporaryBlob, source: str,
                    expected: Mapping[str, str] | None = None) -> IngestResult:
        """``ingest`` for a complete Part 10 file written to ``blob`` (from
        ``blobs.temporary()``), which this takes over: it becomes the stored file (no
        copy), or is discarded."""
        try:
            blob.close()
            with blob.path.open("rb") as file:
                if not is_part10(file.read(132)):
                    return _rejected(Rejection.NOT_PART10, "not a DICOM Part 10 file")
            return self._ingest(blob, source, expected or {})
        except OSError as exc:
            return io_failure(exc)
        finally:
            blob.discard()  # stored: adopted, nothing to delete

    def ingest_path(self, path: Path, source: str) -> IngestResult:
        """``ingest`` for a Part 10 file outside the store (``passerelle import``), copied
        a chunk at a time into a temporary file (never whole in memory), at most
        max_instance_bytes of it; OSError if ``path`` cannot be read."""
        limit = self.limits.max_instance_bytes
        with path.open("rb") as file:
            chunk = with_preamble(file.read(132))
            if chunk is None:
                return _rejected(Rejection.NOT_PART10, "not a DICOM Part 10 file")
            try:
                blob = self.blobs.temporary(limit)
            except OSError as exc:
                return io_failure(exc)
            try:
                while chunk:
                    try:
                        blob.write(chunk)
                    except OSError as exc:  # writing; reading errors go to the caller
                        blob.discard()
                        return io_failure(exc)
                    chunk = file.read(_COMPARE_CHUNK)
            except BlobTooLargeError:
                blob.discard()
                return too_large(limit)
            except BaseException:
                blob.discard()
                raise
        return self.ingest_file(blob, source)

    def _ingest(self, blob: bytes | TemporaryBlob, source: str,
                expected: Mapping[str, str]) -> IngestResult:
        received = blob if isinstance(blob, bytes) else blob.path
        if _size(received) > self.limits.max_instance_bytes:
            return too_large(self.limits.max_instance_bytes)
        try:
            record = read_header(received, self.limits, self.blobs.scratch)
        except OSError as exc:  # reading the temporary file
            return io_failure(exc)
        except UnreadableDatasetError as exc:
            return _rejected(Rejection.UNREADABLE, str(exc))
        except DatasetTooLargeError:
            return too_large(self.limits.max_instance_bytes)
        except DatasetTooComplexError as exc:
            return _rejected(Rejection.TOO_COMPLEX, str(exc))
        problem = _check_identity(record, expected)
        if problem:
            return problem
        try:
            relative = self.blobs.relative_path(record.study_uid, record.series_uid,
                                                record.sop_uid)
        except InvalidUIDError as exc:
            return _rejected(Rejection.INVALID_UID, str(exc), record)
        # IHE IOCM: a rejection note is checked before it is stored, applied once it is.
        note, refusal = self.rejections.screen(record, received)
        if refusal:
            return _rejected(Rejection(refusal.reason), refusal.message, record,
                             refusal.offending)
        result = self._store(record, relative, blob, source)
        if note is not None and result.accepted:
            applied = self.rejections.apply(note, source)
            if self.on_rejection is not None:
                self.on_rejection(applied)
        return result

    def _store(self, record: InstanceRecord, relative: str, blob: bytes | TemporaryBlob,
               source: str) -> IngestResult:
        received = blob if isinstance(blob, bytes) else blob.path
        existing = self.index.find_instance(record.sop_uid)
        try:
            if existing and not self.blobs.absolute(existing.path).is_file():
                return self._restore(record, blob, existing)
            if existing and self.duplicate_policy is DuplicatePolicy.KEEP_FIRST:
                return self._compare_with_stored(record, received, existing)
            return self._write(record, relative, blob, source)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                log.exception("I/O error while storing %s", record.sop_uid)
            return io_failure(exc, record)

    def _compare_with_stored(self, record: InstanceRecord, received: bytes | Path,
                             stored: StoredInstance) -> IngestResult:
        conflict = self.index.identity_conflict(record)
        if conflict:
            return _refused(conflict, record)
        # File meta differs between senders (source AE, implementation UID): compare the
        # data sets only.
        if _same_dataset(self.blobs.absolute(stored.path), received):
            return IngestResult(Outcome.DUPLICATE, "already stored", record=record)
        try:
            same = same_instance(self.blobs.absolute(stored.path), received, self.decode_memory)
        except NotComparableError as exc:
            # Never "success" for what may be another object (PS3.4 B.2.2: success means
            # stored); the sender sees why and may send it again, in the stored syntax.
            return _rejected(Rejection.SOP_INSTANCE_CONFLICT,
                             f"SOP Instance UID already stored in transfer syntax"
                             f" {stored.transfer_syntax}; the re-sent object could not be"
                             f" compared with it ({exc}): not stored", record, "SOPInstanceUID")
        if same:
            return IngestResult(Outcome.DUPLICATE, "already stored in transfer syntax"
                                f" {stored.transfer_syntax}", record=record)
        return _rejected(Rejection.SOP_INSTANCE_CONFLICT,
                         "SOP Instance UID already stored with another data set (kept,"
                         f" duplicate_policy keep-first): {record.sop_uid}",
                         record, "SOPInstanceUID")

    def _restore(self, record: InstanceRecord, blob: bytes | TemporaryBlob,
                 stored: StoredInstance) -> IngestResult:
        """An indexed instance whose file is gone (its local copy removed while a PACS holds
        it, or lost) received again: the file written back where the index has it, the
        index row kept (the study does not change: nothing is published again)."""
        with self.index.database.lock(f"instance {record.sop_uid}"):
            if self.blobs.absolute(stored.path).is_file():  # written back meanwhile
                return self._compare_with_stored(
                    record, blob if isinstance(blob, bytes) else blob.path, stored)
            # A rejection note being applied records the instance before it takes this lock
            # to delete the file and rows: nothing to write back then.
            refusal = self.rejections.admission(record.sop_uid)
            if refusal:
                return _rejected(Rejection(refusal.reason), refusal.message, record,
                                 refusal.offending)
            conflict = self.index.identity_conflict(record)
            if conflict:
                return _refused(conflict, record)
            size = _size(blob if isinstance(blob, bytes) else blob.path)
            if isinstance(blob, bytes):
                self.blobs.put(stored.path, [blob])
            else:
                self.blobs.adopt(blob, stored.path)
            self.index.file_restored(record.sop_uid, size, record.transfer_syntax)
        return IngestResult(Outcome.STORED, "stored again (its local copy had been removed)",
                            record=record)

    def _write(self, record: InstanceRecord, relative: str, blob: bytes | TemporaryBlob,
               source: str) -> IngestResult:
        received = blob if isinstance(blob, bytes) else blob.path
        # Held from the duplicate re-check to the index commit, so two associations sending
        # the same SOP Instance UID at once, to this process or to another process or
        # replica on this database, cannot both write it. Striped by UID: writers of
        # different instances fsync in parallel instead of queueing on one lock.
        with self.index.database.lock(f"instance {record.sop_uid}"):
            existing = self.index.find_instance(record.sop_uid)
            if existing and self.duplicate_policy is DuplicatePolicy.KEEP_FIRST:
                return self._compare_with_stored(record, received, existing)
            refusal = None if existing else self.rejections.admission(record.sop_uid)
            if refusal:
                return _rejected(Rejection(refusal.reason), refusal.message, record,
                                 refusal.offending)
            # Before a byte is written: a replacement must not move the instance, nor
            # overwrite the file of the one it would have replaced.
            conflict = self.index.identity_conflict(record)
            if conflict:
                return _refused(conflict, record)
            replaced = bool(existing) and not _same_dataset(
                self.blobs.absolute(existing.path), received)
            size = _size(received)
            if isinstance(blob, bytes):
                self.blobs.put(relative, [blob])
            else:
                self.blobs.adopt(blob, relative)
            try:
                differing = self.index.add_instance(record, relative, size, source,
                                                    replacing=bool(existing))
            except IdentityConflictError as exc:  # a concurrent first instance of its study
                if not existing:  # a replacement's rows were committed and checked above
                    self.blobs.delete(relative)
                return _refused(exc.conflict, record)
            except BaseException:
                if not existing:
                    self.blobs.delete(relative)
                raise
            if existing and existing.path != relative:
                self.blobs.delete(existing.path)
        if differing:
            log.warning("%s from %s differs from its study %s in %s: the study keeps the"
                        " patient module of its first instance", record.sop_uid, source,
                        record.study_uid, ", ".join(differing))
        if existing:
            outcome = Outcome.CONFLICT if replaced else Outcome.DUPLICATE
            return IngestResult(outcome, "replaced the stored object" if replaced
                                else "already stored", record=record, replaced=replaced)
        return IngestResult(Outcome.STORED, record=record)


def _check_identity(record: InstanceRecord, expected: Mapping[str, str]) -> IngestResult | None:
    found = {"StudyInstanceUID": record.study_uid, "SeriesInstanceUID": record.series_uid,
             "SOPInstanceUID": record.sop_uid, "SOPClassUID": record.sop_class_uid}
    for keyword, value in found.items():
        if not value:
            return _rejected(Rejection.MISSING_UID, f"{keyword} is missing", record)
    for keyword, announced in expected.items():
        if found[keyword] != announced:
            return _rejected(Rejection.UID_MISMATCH, f"{keyword} {found[keyword]} differs "
                                                     f"from the announced {announced}", record)
    return None
