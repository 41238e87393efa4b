"""IHE RAD IOCM (Imaging Object Change Management) on the archive's side: a Key Object
Selection Document whose document title is a rejection note, received by any ingest
(Rejection Note Stored [RAD-66]), takes the instances it references out of use.

The titles (PS3.16 CID 7010 "Key Object Selection Document Title", grouped as CID 7031
"Reason for Removal from Operational Use"; CID 7011 lists the finer reasons of a quality
rejection, not titles) and what each does here (IHE RAD TF RAD-66, 4.66.4.x Expected Actions):

- 113001 Rejected for Quality Reasons: hidden. The archive may hide them or keep them in
  regular use (4.66.4.1.3); hidden here: out of the index, so no query, retrieve or manifest
  returns them, the file kept under ``rejected/`` (the layout of ``studies/``).
- 113037 Rejected for Patient Safety Reasons, 113038 Incorrect Modality Worklist Entry:
  removed (file deleted, index rows gone). "The Image Manager / Archive shall not accept
  subsequent occurrence of instances that have been hidden" (4.66.4.2.3.1, 4.66.4.3.3).
- 113039 Data Retention Policy Expired: removed. The archive "may choose to decide that the
  Data Retention Policy Expired rejection is no longer in force" (4.66.4.4.3); this one does
  not: a PACS that still holds the instance would otherwise bring it back unasked, when a
  study whose local copy retention removed is retrieved again on demand (gateway.pacs).

An instance rejected for any reason and sent again is refused (``admission``), 113001
included: a hidden instance would otherwise be shown again. Each rejected instance has a row
in ``rejected_instances``; so has each note, under its own UID (note_uid = sop_uid): it is
stored and stays queryable and retrievable (the evidence of the change) but is never a study
instance of the published manifest (storage.study_contents leaves out every UID of the table).
Instances a note references that are not stored here are recorded too: they are refused if
they arrive later.

A note applies within its own study: one referencing another study's instances (another
patient's, say), or naming a stored instance or series under another series or study than
it says, is refused whole, nothing stored (``screen``).

Applying is safe against a crash and a concurrent ingest of a rejected instance: rows
recorded (one transaction); each instance's ingest lock passed once (an ingest that holds it
finishes first, one taking it later sees the row); files moved aside or deleted; then the
index rows deleted and the manifest's replacement or withdrawal queued, in one transaction.
``settle`` finishes at start what a crash interrupted.
"""

import contextlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.filereader
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset
from sqlalchemy import Connection, text

from storage.blobs import BlobStore, fsync_dir
from storage.database import json_values
from storage.header import InstanceRecord
from storage.index import Index
from storage.outbox import Action, Outbox, State
from storage.structure import IngestLimits, encoded_dataset
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
REASONS = {"113001": "Rejected for Quality Reasons",
           "113037": "Rejected for Patient Safety Reasons",
           "113038": "Incorrect Modality Worklist Entry",
           "113039": "Data Retention Policy Expired"}
HIDING = frozenset({"113001"})  # kept under rejected/; the others are deleted

_NOTE_TAGS = [keyword_dict[keyword] for keyword in (
    "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "ConceptNameCodeSequence",
    "CurrentRequestedProcedureEvidenceSequence")]
_EVIDENCE = "CurrentRequestedProcedureEvidenceSequence"

# A later note takes a row over, but a retention expiry never lifts a refusing reason.
_RECORD = text("""
    INSERT INTO rejected_instances (sop_uid, study_uid, series_uid, reason, note_uid,
                                    rejected_at)
    VALUES (:sop_uid, :study_uid, :series_uid, :reason, :note_uid, :now)
    ON CONFLICT (sop_uid) DO UPDATE SET reason = excluded.reason,
        note_uid = excluded.note_uid, rejected_at = excluded.rejected_at
    WHERE rejected_instances.note_uid != excluded.note_uid
      AND (rejected_instances.reason = '113039' OR excluded.reason != '113039')
""")
# Rejected instances still indexed: what ``apply`` has yet to take out (or a crash left).
_PENDING = """
    FROM rejected_instances r JOIN instances i ON i.sop_uid = r.sop_uid
    JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk
    WHERE r.sop_uid != r.note_uid AND r.study_uid = st.study_uid"""
_REMAINING = text("""
    SELECT count(*) FROM instances i JOIN series se ON i.series_pk = se.pk
    JOIN studies st ON se.study_pk = st.pk WHERE st.study_uid = :study_uid
    AND NOT EXISTS (SELECT 1 FROM rejected_instances r WHERE r.sop_uid = i.sop_uid)""")


class InvalidNoteError(ValueError):
    """A rejection note that cannot be applied as it stands (said in the message)."""


@dataclass(frozen=True, slots=True)
class Reference:
    """One instance a rejection note names, where it says the instance is."""

    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True, slots=True)
class RejectionNote:
    """A KOS titled with one of ``REASONS`` and what it rejects."""

    sop_uid: str
    study_uid: str
    series_uid: str
    reason: str  # the title's code value
    references: tuple[Reference, ...]

    @property
    def meaning(self) -> str:
        """The title's code meaning."""
        return REASONS[self.reason]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an ingest must refuse an object: ``reason`` is a storage.store.Rejection value."""

    reason: str
    message: str
    offending: str = ""


@dataclass(frozen=True, slots=True)
class AppliedRejection:
    """What applying a note did now (a note applied again does nothing more)."""

    note_uid: str
    study_uid: str
    reason: str
    source: str  # who sent the note (calling AE title, "stow", "import")
    recorded: int  # rows the note added or took over in rejected_instances
    removed: int  # instances deleted now
    hidden: int  # instances moved aside now
    not_stored: int  # referenced instances not stored here (recorded, refused if sent)
    publication: Action | None  # the manifest's replacement or withdrawal queued, if any

    @property
    def changed(self) -> bool:
        """True when the note changed anything."""
        return bool(self.recorded or self.removed or self.hidden or self.publication)

    @property
    def meaning(self) -> str:
        """The reason's code meaning."""
        return REASONS[self.reason]


@dataclass(frozen=True, slots=True)
class RejectedInstance:
    """One row of ``rejected_instances``."""

    sop_uid: str
    study_uid: str
    series_uid: str
    reason: str
    note_uid: str
    rejected_at: float


def _title(ds: Dataset) -> str | None:
    """The code of the document title when it is one of REASONS (coded DCM)."""
    items = ds.get("ConceptNameCodeSequence") or []
    if len(items) != 1 or items[0].get("CodingSchemeDesignator") != "DCM":
        return None
    code = str(items[0].get("CodeValue", ""))
    return code if code in REASONS else None


def _references(ds: Dataset) -> tuple[Reference, ...]:
    """The instances of the Current Requested Procedure Evidence Sequence (PS3.3 C.17.6.2.1,
    Hierarchical SOP Instance Reference Macro), each once; InvalidNoteError if one of their
    UIDs is invalid or none is named."""
    found: dict[Reference, None] = {}
    for study in ds.get(_EVIDENCE) or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            for sop in series.get("ReferencedSOPSequence") or []:
                reference = Reference(str(study.get("StudyInstanceUID", "")),
                                      str(series.get("SeriesInstanceUID", "")),
                                      str(sop.get("ReferencedSOPInstanceUID", "")))
                for name, uid in zip(("Study", "Series", "SOP Instance"), (
                        reference.study_uid, reference.series_uid, reference.sop_uid),
                        strict=True):
                    if not is_valid_uid(uid):
                        raise InvalidNoteError(f"rejection note references an invalid {name}"
                                               f" Instance UID {uid[:80]!r}")
                found[reference] = None
    if not found:
        raise InvalidNoteError(f"rejection note references no instance ({_EVIDENCE} empty)")
    return tuple(found)


def read_note(source: bytes | Path, limits: IngestLimits | None = None,
              scratch: Callable[[], BinaryIO] | None = None) -> RejectionNote | None:
    """The rejection note a KOS Part 10 file holds, None when its title is no rejection
    (``limits`` bound a deflated data set as ``read_header`` does; the structure was walked
    by it already); InvalidNoteError when it is one but names nothing it can reject."""
    with contextlib.ExitStack() as stack:
        file = stack.enter_context(source.open("rb") if isinstance(source, Path)
                                   else io.BytesIO(source))
        dataset, _ = stack.enter_context(encoded_dataset(file, limits, scratch))
        try:
            if dataset is file:
                file.seek(0)
                ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=_NOTE_TAGS)
            else:  # inflated
                ds = pydicom.filereader.read_dataset(dataset, is_implicit_VR=False,
                                                     is_little_endian=True,
                                                     specific_tags=_NOTE_TAGS)
            reason = _title(ds)
            if reason is None:
                return None
            references = _references(ds)
        except InvalidNoteError:
            raise
        except Exception as exc:  # pydicom raises many types on malformed input
            raise InvalidNoteError(f"rejection note unreadable: {exc}") from exc
    note_uid = str(ds.get("SOPInstanceUID", ""))
    return RejectionNote(note_uid, str(ds.get("StudyInstanceUID", "")),
                         str(ds.get("SeriesInstanceUID", "")), reason,
                         tuple(r for r in references if r.sop_uid != note_uid))



class Rejections:
    """The rejection notes of a store's index and files."""

    def __init__(self, index: Index, blobs: BlobStore, limits: IngestLimits) -> None:
        self.index = index
        self.blobs = blobs
        self.limits = limits
        self.outbox = Outbox(index)

    def screen(self, record: InstanceRecord, source: bytes | Path
               ) -> tuple[RejectionNote | None, Refusal | None]:
        """For an object about to be stored: the rejection note it is (None if it is none),
        or why it must be refused."""
        if record.sop_class_uid != KOS_SOP_CLASS:
            return None, None
        try:
            note = read_note(source, self.limits, self.blobs.scratch)
        except InvalidNoteError as exc:
            return None, Refusal("rejection-note-invalid", str(exc), _EVIDENCE)
        if note is None:
            return None, None
        problem = self._misplaced(note)
        return (None, problem) if problem else (note, None)

    def _misplaced(self, note: RejectionNote) -> Refusal | None:
        """Why ``note`` cannot apply where it says: a reference outside its study, or to a
        series or instance the index holds elsewhere. The messages name only what the note
        says (never another patient's study)."""
        for reference in note.references:
            if reference.study_uid != note.study_uid:
                return Refusal("rejection-note-outside-study",
                               f"references another study than its own: {reference.study_uid}"
                               f" (rejection note {note.sop_uid} of study {note.study_uid}"
                               " applies within it)", "StudyInstanceUID")
        sops = {r.sop_uid: r for r in note.references}
        for sop_uid, series_uid in self._where(
                "SELECT i.sop_uid, se.series_uid FROM instances i JOIN series se"
                " ON i.series_pk = se.pk WHERE i.sop_uid IN", list(sops)):
            if series_uid != sops[sop_uid].series_uid:
                return Refusal("rejection-note-outside-study",
                               f"references an instance stored in another series: {sop_uid}"
                               f" (not in {sops[sop_uid].series_uid})",
                               "ReferencedSOPInstanceUID")
        series = {r.series_uid for r in note.references}
        for series_uid, study_uid in self._where(
                "SELECT se.series_uid, st.study_uid FROM series se JOIN studies st"
                " ON se.study_pk = st.pk WHERE se.series_uid IN", sorted(series)):
            if study_uid != note.study_uid:
                return Refusal("rejection-note-outside-study",
                               f"references a series of another study: {series_uid} (not of"
                               f" {note.study_uid})", "SeriesInstanceUID")
        return None

    def _where(self, sql: str, uids: list[str]) -> list[tuple[str, str]]:
        """The rows of ``sql`` (ending with ``IN``) for each of ``uids``."""
        return [(row[0], row[1]) for row in self.index.fetch(
            f"{sql} ({json_values(self.index.dialect, 'uids')})", {"uids": json.dumps(uids)})]

    def admission(self, sop_uid: str) -> Refusal | None:
        """Why an instance sent again must be refused (None: it may be stored); called under
        its ingest lock."""
        rows = self.index.fetch("SELECT reason, note_uid FROM rejected_instances"
                                " WHERE sop_uid = :sop_uid AND note_uid != sop_uid",
                                {"sop_uid": sop_uid})
        if not rows:
            return None
        reason, note_uid = rows[0]
        return Refusal("previously-rejected",
                       f"rejected ({reason}, {REASONS[reason]}) by IOCM rejection note"
                       f" {note_uid}, not accepted again: {sop_uid}", "SOPInstanceUID")

    def apply(self, note: RejectionNote, source: str) -> AppliedRejection:
        """Record the note and what it rejects, take the stored ones out of use, queue the
        manifest's replacement or withdrawal; the note is stored already."""
        stored = len(self._where("SELECT sop_uid, sop_uid FROM instances WHERE sop_uid IN",
                                 [r.sop_uid for r in note.references]))
        with self.index.transaction() as db:
            now = self.index.database.now(db)
            recorded = sum(db.execute(_RECORD, {
                "sop_uid": r.sop_uid, "study_uid": r.study_uid, "series_uid": r.series_uid,
                "reason": note.reason, "note_uid": note.sop_uid, "now": now}).rowcount
                for r in note.references)
            db.execute(_RECORD, {"sop_uid": note.sop_uid, "study_uid": note.study_uid,
                                 "series_uid": note.series_uid, "reason": note.reason,
                                 "note_uid": note.sop_uid, "now": now})
        for reference in note.references:
            with self.index.database.lock(f"instance {reference.sop_uid}"):
                pass  # an ingest of it under way has committed; a later one sees the row
            if note.reason not in HIDING:  # removed after being hidden: the kept copy goes
                self.blobs.delete(self.kept_path(reference.study_uid, reference.series_uid,
                                                 reference.sop_uid))
        removed, hidden, publication = self._settle_study(note.study_uid)
        applied = AppliedRejection(note.sop_uid, note.study_uid, note.reason, source,
                                   recorded, removed, hidden, len(note.references) - stored,
                                   publication)
        if applied.changed:
            log.info("rejection note %s from %s (%s %s) applied to study %s: %d instance(s)"
                     " removed, %d hidden, %d referenced not stored here (refused if sent);"
                     " manifest: %s", note.sop_uid, source, note.reason, note.meaning,
                     note.study_uid, removed, hidden, applied.not_stored,
                     _outcome(publication))
        return applied

    def settle(self) -> None:
        """Finish what an interrupted ``apply`` left: rejected instances still indexed."""
        for (study_uid,) in self.index.fetch(f"SELECT DISTINCT st.study_uid {_PENDING}"):
            removed, hidden, publication = self._settle_study(study_uid)
            log.warning("study %s: a rejection interrupted earlier finished: %d instance(s)"
                        " removed, %d hidden; manifest: %s", study_uid, removed, hidden,
                        _outcome(publication))

    def _settle_study(self, study_uid: str) -> tuple[int, int, Action | None]:
        """Take the rejected instances of a study still indexed out of use: each file
        moved aside (hidden) or deleted, then, in one transaction, their rows deleted and
        the manifest's replacement or withdrawal queued. How many were removed and hidden,
        and what was queued."""
        pending = self.index.fetch(f"SELECT r.sop_uid, r.reason, i.path, se.series_uid"
                                   f" {_PENDING} AND st.study_uid = :study_uid",
                                   {"study_uid": study_uid})
        for sop_uid, reason, path, series_uid in pending:
            if reason in HIDING:
                self._move(path, self.kept_path(study_uid, series_uid, sop_uid))
            else:
                self.blobs.delete(path)
        published = self._published(study_uid)
        removed = hidden = 0
        publication = None
        with self.index.transaction() as db:
            for sop_uid, reason, _, _ in pending:
                if _drop_instance(db, sop_uid):
                    if reason in HIDING:
                        hidden += 1
                    else:
                        removed += 1
            remaining = db.execute(_REMAINING, {"study_uid": study_uid}).scalar_one()
            if not remaining:  # nothing to publish: the stable-study flow must not try
                db.execute(text("UPDATE studies SET queued_changes = changes"
                                " WHERE study_uid = :study_uid"), {"study_uid": study_uid})
            if (removed or hidden) and published:
                publication = Action.PUBLISH if remaining else Action.UNPUBLISH
                self.outbox.queue_in(db, study_uid, publication)
        return removed, hidden, publication

    def _published(self, study_uid: str) -> bool:
        """True when the registry holds, or may hold, a manifest of the study: one
        acknowledged, or one on the wire (sent, its answer not yet read)."""
        return self.outbox.published_document(study_uid) is not None or any(
            row.action is Action.PUBLISH for row in self.outbox.listing((State.SENT,),
                                                                         study_uid))

    def kept_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Where the file of an instance hidden by a note is kept, relative to the root."""
        relative = self.blobs.relative_path(study_uid, series_uid, sop_uid)
        return "rejected/" + relative.removeprefix("studies/")

    def _move(self, relative: str, kept: str) -> None:
        """Move a file aside durably (gone already: moved by an earlier attempt)."""
        source, target = self.blobs.absolute(relative), self.blobs.absolute(kept)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            source.replace(target)
        except FileNotFoundError:
            return
        fsync_dir(target.parent)
        fsync_dir(source.parent)

    def listing(self, study_uid: str | None = None) -> list[RejectedInstance]:
        """The instances rejected (of one study, if given), notes left out, oldest first."""
        of_study = " AND study_uid = :study_uid" if study_uid else ""
        return [RejectedInstance(*row) for row in self.index.fetch(
            "SELECT sop_uid, study_uid, series_uid, reason, note_uid, rejected_at"
            f" FROM rejected_instances WHERE sop_uid != note_uid{of_study}"
            " ORDER BY rejected_at, sop_uid", {"study_uid": study_uid})]


def _outcome(publication: Action | None) -> str:
    """What became of the manifest, for a log line."""
    if publication is None:
        return "left to the stable-study flow"
    return "replacement queued" if publication is Action.PUBLISH else "withdrawal queued"


def _drop_instance(db: Connection, sop_uid: str) -> bool:
    """Delete an instance's index rows (its series too when it was the last); False when
    another transaction did first."""
    db.execute(text("DELETE FROM instance_metadata WHERE instance_pk IN"
                    " (SELECT pk FROM instances WHERE sop_uid = :sop_uid)"), {"sop_uid": sop_uid})
    series_pk = db.execute(text("DELETE FROM instances WHERE sop_uid = :sop_uid"
                                " RETURNING series_pk"), {"sop_uid": sop_uid}).scalar()
    if series_pk is None:
        return False
    db.execute(text("DELETE FROM series WHERE pk = :pk AND NOT EXISTS"
                    " (SELECT 1 FROM instances WHERE series_pk = :pk)"), {"pk": series_pk})
    return True
