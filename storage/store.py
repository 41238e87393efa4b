"""The ingest path shared by C-STORE, STOW-RS and ``passerelle import``.

``Store.ingest`` takes one Part 10 file as bytes and either stores it durably (file fsynced,
index committed) or rejects it leaving nothing behind. Callers turn the outcome into a DIMSE
status, an HTTP answer or a line of the import summary.
"""

import enum
import errno
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from storage.blobs import BlobStore, InvalidUIDError
from storage.header import InstanceRecord, UnreadableDatasetError, read_header
from storage.index import Index
from storage.part10 import dataset_bytes, with_preamble

log = logging.getLogger(__name__)

_UID_LOCK_STRIPES = 64


class DuplicatePolicy(enum.StrEnum):
    """What to do when an instance arrives again under a stored SOP Instance UID."""

    KEEP_FIRST = "keep-first"
    OVERWRITE = "overwrite"


class Outcome(enum.StrEnum):
    """How an ingest ended."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same data set: nothing to do
    CONFLICT = "conflict"  # same SOP Instance UID, different data set
    REJECTED = "rejected"  # invalid input: nothing stored
    OUT_OF_RESOURCES = "out-of-resources"  # disk full or I/O error: nothing stored


class Rejection(enum.StrEnum):
    """Why an input was rejected; also the metric label."""

    NOT_PART10 = "not-part10"
    UNREADABLE = "unreadable"
    MISSING_UID = "missing-uid"
    INVALID_UID = "invalid-uid"
    UID_MISMATCH = "uid-mismatch"
    DISK_FULL = "disk-full"
    IO_ERROR = "io-error"


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What happened to one input, with a message fit for a peer or an operator."""

    outcome: Outcome
    message: str = ""
    reason: Rejection | None = None
    record: InstanceRecord | None = None
    replaced: bool = False  # a conflicting instance was overwritten

    @property
    def accepted(self) -> bool:
        """True when the instance is (now or already) safely stored."""
        return self.outcome in (Outcome.STORED, Outcome.DUPLICATE, Outcome.CONFLICT)


def _rejected(reason: Rejection, message: str,
              record: InstanceRecord | None = None) -> IngestResult:
    outcome = (Outcome.OUT_OF_RESOURCES if reason in (Rejection.DISK_FULL, Rejection.IO_ERROR)
               else Outcome.REJECTED)
    return IngestResult(outcome, message, reason, record)


class Store:
    """Files plus index under one data directory."""

    def __init__(self, data_dir: Path,
                 duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(data_dir)
        self.index = Index(data_dir / "index.sqlite")
        self.duplicate_policy = duplicate_policy
        # Held from the duplicate re-check to the index commit, so two associations sending
        # the same SOP Instance UID at once cannot both write it. Striped by UID: writers of
        # different instances fsync in parallel instead of queueing on one lock.
        self._uid_locks = tuple(threading.Lock() for _ in range(_UID_LOCK_STRIPES))

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
        data = normalised
        try:
            record = read_header(data)
        except UnreadableDatasetError as exc:
            return _rejected(Rejection.UNREADABLE, str(exc))
        problem = _check_identity(record, expected or {})
        if problem:
            return problem
        try:
            relative = self.blobs.relative_path(record.study_uid, record.series_uid,
                                                record.sop_uid)
        except InvalidUIDError as exc:
            return _rejected(Rejection.INVALID_UID, str(exc), record)

        existing = self.index.find_instance(record.sop_uid)
        if existing and self.duplicate_policy is DuplicatePolicy.KEEP_FIRST:
            return self._compare_with_stored(record, data, existing.path)
        try:
            return self._write(record, relative, data, source)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return _rejected(Rejection.DISK_FULL, "out of disk space", record)
            log.exception("I/O error while storing %s", record.sop_uid)
            return _rejected(Rejection.IO_ERROR, f"I/O error: {exc.strerror or exc}", record)

    def _compare_with_stored(self, record: InstanceRecord, data: bytes,
                             stored_path: str) -> IngestResult:
        # File meta differs between senders (source AE, implementation UID): compare the
        # data sets only.
        if dataset_bytes(self.blobs.read(stored_path)) == dataset_bytes(data):
            return IngestResult(Outcome.DUPLICATE, "already stored", record=record)
        return IngestResult(Outcome.CONFLICT,
                            "a different object is already stored under this SOP Instance UID;"
                            " kept the first one", record=record)

    def _write(self, record: InstanceRecord, relative: str, data: bytes,
               source: str) -> IngestResult:
        with self._uid_locks[hash(record.sop_uid) % _UID_LOCK_STRIPES]:
            existing = self.index.find_instance(record.sop_uid)
            if existing and self.duplicate_policy is DuplicatePolicy.KEEP_FIRST:
                return self._compare_with_stored(record, data, existing.path)
            replaced = bool(existing) and (
                dataset_bytes(self.blobs.read(existing.path)) != dataset_bytes(data))
            self.blobs.put(relative, [data])
            try:
                self.index.add_instance(record, relative, len(data), source,
                                        replacing=bool(existing))
            except BaseException:
                if not existing:
                    self.blobs.delete(relative)
                raise
            if existing and existing.path != relative:
                self.blobs.delete(existing.path)
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
