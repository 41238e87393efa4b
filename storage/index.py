"""SQLite index of patients, studies, series and instances (WAL; its schema: storage.schema).

One connection shared by the threads of the process, serialised by a lock: SQLite allows a
single writer anyway, and a commit is far shorter than receiving an instance.
"""

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.header import InstanceRecord
from storage.identifiers import encode
from storage.schema import MIN_SQLITE, migrate
from storage.search import (
    Level,
    Match,
    count,
    fold_name,
    name_group,
    request_items,
    search,
    with_request_items,
)

_PATIENT_UPSERT = """
    INSERT INTO patients (patient_id, issuer_of_patient_id)
    VALUES (:patient_id, :issuer_of_patient_id)
    ON CONFLICT (patient_id, issuer_of_patient_id) DO UPDATE SET patient_id = patient_id
    RETURNING pk
"""
# The patient module of a study is written by its first instance and kept (one truth per
# study: its QIDO answers and its manifest agree whatever arrives later).
_STUDY_UPSERT = """
    INSERT INTO studies (study_uid, patient_pk, study_date, study_time, accession_number,
                         accession_issuer, study_id, study_description, referring_physician,
                         requested_procedure_ids, placer_order_numbers, first_received_at,
                         last_received_at, referring_physician_folded, character_set,
                         other_patient_ids, patient_name, patient_name_folded, patient_birth_date,
                         patient_sex, patient_id_qualifiers)
    VALUES (:study_uid, :patient_pk, :study_date, :study_time, :accession_number,
            :accession_issuer, :study_id, :study_description, :referring_physician,
            :requested_procedure_ids, :placer_order_numbers, :now, :now,
            fold_name(:referring_physician), :character_set, :other_patient_ids, :patient_name,
            fold_name(:patient_name), :patient_birth_date, :patient_sex,
            :patient_id_qualifiers)
    ON CONFLICT (study_uid) DO UPDATE SET last_received_at = excluded.last_received_at
    RETURNING pk
"""
_SET_PATIENT_MODULE = """
    UPDATE studies SET other_patient_ids = :other_patient_ids, patient_name = :patient_name,
        patient_name_folded = fold_name(:patient_name), patient_birth_date = :patient_birth_date,
        patient_sex = :patient_sex, patient_id_qualifiers = :patient_id_qualifiers
    WHERE study_uid = :study_uid
"""
# The study and series modules are those of their first instance too; replacing it (a
# corrected re-send under duplicate_policy overwrite, fixed at the RIS) replaces them.
_SET_STUDY_MODULE = """
    UPDATE studies SET study_date = :study_date, study_time = :study_time,
        accession_number = :accession_number, accession_issuer = :accession_issuer,
        study_id = :study_id, study_description = :study_description,
        referring_physician = :referring_physician,
        referring_physician_folded = fold_name(:referring_physician),
        requested_procedure_ids = :requested_procedure_ids,
        placer_order_numbers = :placer_order_numbers, character_set = :character_set
    WHERE pk = :study_pk
"""
_SET_SERIES_MODULE = """
    UPDATE series SET modality = :modality, series_number = :series_number,
        series_description = :series_description, body_part = :body_part,
        series_date = :series_date, series_time = :series_time, requests = :requests
    WHERE pk = :series_pk
"""
# The first instance of a study (of a series) is its oldest row (a replaced instance keeps
# its row).
_IS_FIRST_OF_STUDY = """
    SELECT min(i.pk) = (SELECT pk FROM instances WHERE sop_uid = :sop_uid)
    FROM instances i JOIN series se ON i.series_pk = se.pk WHERE se.study_pk = :study_pk
"""
_IS_FIRST_OF_SERIES = """
    SELECT min(pk) = (SELECT pk FROM instances WHERE sop_uid = :sop_uid)
    FROM instances WHERE series_pk = :series_pk
"""
_SERIES_UPSERT = """
    INSERT INTO series (series_uid, study_pk, modality, series_number, series_description,
                        body_part, series_date, series_time, requests)
    VALUES (:series_uid, :study_pk, :modality, :series_number, :series_description,
            :body_part, :series_date, :series_time, :requests)
    ON CONFLICT (series_uid) DO UPDATE SET series_uid = series_uid
    RETURNING pk
"""
_INSTANCE_UPSERT = """
    INSERT INTO instances (sop_uid, series_pk, sop_class_uid, instance_number, transfer_syntax,
                           rows, columns, frames, path, size, source, received_at,
                           timezone_offset, bits_allocated, pps_start_date, pps_start_time,
                           request_attributes)
    VALUES (:sop_uid, :series_pk, :sop_class_uid, :instance_number, :transfer_syntax,
            :rows, :columns, :frames, :path, :size, :source, :now,
            :timezone_offset, :bits_allocated, :pps_start_date, :pps_start_time,
            :request_attributes)
    ON CONFLICT (sop_uid) DO UPDATE SET
        sop_class_uid = excluded.sop_class_uid, instance_number = excluded.instance_number,
        transfer_syntax = excluded.transfer_syntax, rows = excluded.rows,
        columns = excluded.columns, frames = excluded.frames, path = excluded.path,
        size = excluded.size, source = excluded.source, received_at = excluded.received_at,
        timezone_offset = excluded.timezone_offset, bits_allocated = excluded.bits_allocated,
        pps_start_date = excluded.pps_start_date, pps_start_time = excluded.pps_start_time,
        request_attributes = excluded.request_attributes
"""
_INSTANCE_COLUMNS = """i.sop_uid, st.study_uid, se.series_uid, i.path, i.size, i.sop_class_uid,
    i.transfer_syntax, i.frames, i.received_at"""
_INSTANCE_FROM = """FROM instances i JOIN series se ON i.series_pk = se.pk
    JOIN studies st ON se.study_pk = st.pk"""


def _instance_filter(study_uid: str, series_uid: str | None, sop_uid: str | None,
                     within: frozenset[str] | None) -> tuple[str, list[str]]:
    """The WHERE clause (and its parameters) of the instances of a study, series or
    instance, only those ``within`` when given."""
    sql, params = " WHERE st.study_uid = ?", [study_uid]
    if series_uid is not None:
        sql += " AND se.series_uid = ?"
        params.append(series_uid)
    if sop_uid is not None:
        sql += " AND i.sop_uid = ?"
        params.append(sop_uid)
    if within is not None:  # one parameter, however many UIDs
        sql += " AND i.sop_uid IN (SELECT value FROM json_each(?))"
        params.append(json.dumps(sorted(within)))
    return sql, params


_STUDY_SUMMARY = """
    SELECT st.study_uid, p.patient_id, p.issuer_of_patient_id, st.patient_name,
           st.study_date, st.study_time, st.accession_number, st.study_description,
           (SELECT group_concat(DISTINCT se.modality) FROM series se
             WHERE se.study_pk = st.pk AND se.modality != '') AS modalities,
           (SELECT count(*) FROM series se WHERE se.study_pk = st.pk) AS series_count,
           (SELECT count(*) FROM instances i JOIN series se ON i.series_pk = se.pk
             WHERE se.study_pk = st.pk) AS instance_count
    FROM studies st JOIN patients p ON st.patient_pk = p.pk {where}
    ORDER BY st.study_date DESC, st.study_time DESC, st.pk DESC
"""


@dataclass(frozen=True, slots=True)
class IdentityConflict:
    """Why an instance cannot be indexed where its data set puts it: the index knows
    ``keyword`` (SOPInstanceUID, SeriesInstanceUID, PatientID) with another parent."""

    keyword: str
    message: str


class IdentityConflictError(Exception):
    """``add_instance`` refused an instance that would move across studies or patients."""

    def __init__(self, conflict: IdentityConflict) -> None:
        super().__init__(conflict.message)
        self.conflict = conflict


def _qualified(patient_id: str, issuer: str) -> str:
    """A Patient ID with its issuer, in the HL7 CX shape dcm4che logs (ID^^^issuer)."""
    return f"{patient_id}^^^{issuer}" if issuer else patient_id


def _identity_conflict(db: sqlite3.Connection, record: InstanceRecord
                       ) -> IdentityConflict | None:
    """The first way ``record`` contradicts the index: its SOP Instance UID stored in
    another series or study, its study under another Patient ID or issuer, its series in
    another study. The messages name only what the sender sent (not the other patient)."""
    row = db.execute(f"SELECT se.series_uid, st.study_uid {_INSTANCE_FROM}"
                     " WHERE i.sop_uid = ?", (record.sop_uid,)).fetchone()
    if row and tuple(row) != (record.series_uid, record.study_uid):
        return IdentityConflict("SOPInstanceUID", "SOP Instance UID already stored in another"
                                f" series or study: {record.sop_uid}")
    row = db.execute("""SELECT p.patient_id, p.issuer_of_patient_id FROM studies st
                        JOIN patients p ON st.patient_pk = p.pk WHERE st.study_uid = ?""",
                     (record.study_uid,)).fetchone()
    if row and tuple(row) != (record.patient_id, record.issuer_of_patient_id):
        return IdentityConflict("PatientID", "Study Instance UID already of another patient"
                                " than Patient ID "
                                f"{_qualified(record.patient_id, record.issuer_of_patient_id)}:"
                                f" {record.study_uid}")
    row = db.execute("""SELECT st.study_uid FROM series se JOIN studies st
                        ON se.study_pk = st.pk WHERE se.series_uid = ?""",
                     (record.series_uid,)).fetchone()
    if row and row[0] != record.study_uid:
        return IdentityConflict("SeriesInstanceUID", "Series Instance UID already in another"
                                f" study than {record.study_uid}: {record.series_uid}")
    return None


# The patient module a study keeps from its first instance: column -> keyword.
_DEMOGRAPHICS = {"patient_name": "PatientName", "patient_birth_date": "PatientBirthDate",
                 "patient_sex": "PatientSex", "other_patient_ids": "OtherPatientIDsSequence"}


def _differing_demographics(db: sqlite3.Connection, record: InstanceRecord) -> list[str]:
    """The patient module attributes in which ``record`` differs from its (known) study."""
    row = db.execute(f"SELECT {', '.join(_DEMOGRAPHICS)} FROM studies WHERE study_uid = ?",
                     (record.study_uid,)).fetchone()
    if row is None:
        return []
    return [keyword for (column, keyword), kept in zip(_DEMOGRAPHICS.items(), row, strict=True)
            if getattr(record, column) != kept]


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """Where an indexed instance lives, and how it is encoded."""

    sop_uid: str
    study_uid: str
    series_uid: str
    path: str
    size: int
    sop_class_uid: str
    transfer_syntax: str
    frames: int | None
    received_at: float  # seconds since the epoch; changes when the object is replaced


@dataclass(frozen=True, slots=True)
class StudySummary:
    """One line of the study list."""

    study_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    modalities: list[str]
    series_count: int
    instance_count: int


class UnsupportedSQLiteError(ValueError):
    """The SQLite library Python runs with is older than MIN_SQLITE."""


def _request_items_text(text: str) -> str:
    """A Request Attributes column (a JSON list of items) as its distinct items, bounded."""
    return encode(request_items([text]))


class Index:
    """The SQL index. Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise UnsupportedSQLiteError(
                f"SQLite {sqlite3.sqlite_version} is older than"
                f" {'.'.join(map(str, MIN_SQLITE))}, the oldest the index runs on: run"
                " Python with a newer SQLite library (Debian 12 or later has one)")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a commit survives a process crash but not a power cut; the files, always
        # fsynced, are the truth, and Store.recover re-indexes them after an unclean stop.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.create_function("fold_name", 1, fold_name, deterministic=True)
        self._db.create_function("name_group", 2, name_group, deterministic=True)
        self._db.create_function("request_items_text", 1, _request_items_text,
                                 deterministic=True)
        self._migrate()

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    @property
    def schema_version(self) -> int:
        """Schema version currently applied."""
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        with self.transaction() as db:
            migrate(db)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def fetch(self, sql: str, params: object = ()) -> list[tuple]:
        """Rows of one read-only statement (for the storage modules built on the index)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def find_instance(self, sop_uid: str) -> StoredInstance | None:
        """The stored instance with this SOP Instance UID, if any."""
        with self._lock:
            row = self._db.execute(f"SELECT {_INSTANCE_COLUMNS} {_INSTANCE_FROM}"
                                   " WHERE i.sop_uid = ?", (sop_uid,)).fetchone()
        return StoredInstance(*row) if row else None

    def instances(self, study_uid: str, series_uid: str | None = None,
                  sop_uid: str | None = None, within: frozenset[str] | None = None
                  ) -> list[StoredInstance]:
        """Instances of a study, optionally of one series or one instance, and only those
        whose SOP Instance UID is ``within`` when given, in series then instance number
        order."""
        return [instance for instance, _ in self._instances(study_uid, series_uid, sop_uid,
                                                             within, with_metadata=False)]

    def instances_with_metadata(self, study_uid: str, series_uid: str | None = None,
                                sop_uid: str | None = None,
                                within: frozenset[str] | None = None
                                ) -> list[tuple[StoredInstance, str | None]]:
        """Like ``instances``, each with its cached DICOM JSON text (None if not cached)."""
        return self._instances(study_uid, series_uid, sop_uid, within, with_metadata=True)

    def cached_metadata_size(self, study_uid: str, series_uid: str | None = None,
                             sop_uid: str | None = None,
                             within: frozenset[str] | None = None) -> int:
        """Characters of the cached DICOM JSON texts of those instances, counted without
        loading them."""
        where, params = _instance_filter(study_uid, series_uid, sop_uid, within)
        sql = ("SELECT COALESCE(SUM(LENGTH(m.json)), 0) " + _INSTANCE_FROM +
               " JOIN instance_metadata m ON m.instance_pk = i.pk" + where)
        with self._lock:
            return int(self._db.execute(sql, params).fetchone()[0])

    def _instances(self, study_uid: str, series_uid: str | None, sop_uid: str | None,
                   within: frozenset[str] | None, with_metadata: bool
                   ) -> list[tuple[StoredInstance, str | None]]:
        sql = (f"SELECT {_INSTANCE_COLUMNS}, m.json {_INSTANCE_FROM}"
               " LEFT JOIN instance_metadata m ON m.instance_pk = i.pk" if with_metadata else
               f"SELECT {_INSTANCE_COLUMNS}, NULL {_INSTANCE_FROM}")
        where, params = _instance_filter(study_uid, series_uid, sop_uid, within)
        sql += where + " ORDER BY se.series_number, se.pk, i.instance_number, i.pk"
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [(StoredInstance(*row[:-1]), row[-1]) for row in rows]

    def cache_metadata(self, items: list[tuple[str, str]]) -> None:
        """Remember the DICOM JSON text of instances, given as (SOP Instance UID, JSON)."""
        with self.transaction() as db:
            db.executemany(
                """INSERT OR REPLACE INTO instance_metadata (instance_pk, json)
                   SELECT pk, ? FROM instances WHERE sop_uid = ?""",
                [(text, sop_uid) for sop_uid, text in items])

    def identity_conflict(self, record: InstanceRecord) -> IdentityConflict | None:
        """How ``record`` contradicts the index (None: it can be indexed as it says)."""
        with self._lock:
            return _identity_conflict(self._db, record)

    def add_instance(self, record: InstanceRecord, path: str, size: int, source: str,
                     replacing: bool = False) -> list[str]:
        """Insert (or, ``replacing``, update) an instance with its series, study and patient,
        in one commit; IdentityConflictError, nothing written, when ``identity_conflict``
        finds one. The patient and study modules of a study are those of its first instance,
        a series' attributes those of its first: replacing that instance replaces them.
        Returns the patient module attributes in which the instance differs from its
        study's."""
        params = asdict(record)
        params.update(path=path, size=size, source=source, now=time.time(),
                      request_attributes=_request_items_text(record.request_attributes))
        with self.transaction() as db:
            # Checked again inside the write transaction: two instances of one new study
            # with different Patient IDs may pass the check before either commits.
            conflict = _identity_conflict(db, record)
            if conflict:
                raise IdentityConflictError(conflict)
            params["patient_pk"] = db.execute(_PATIENT_UPSERT, params).fetchone()[0]
            params["study_pk"] = db.execute(_STUDY_UPSERT, params).fetchone()[0]
            params["series_pk"] = db.execute(_SERIES_UPSERT, params).fetchone()[0]
            db.execute(_INSTANCE_UPSERT, params)
            if replacing:  # the cached metadata described the previous object
                db.execute("DELETE FROM instance_metadata WHERE instance_pk ="
                           " (SELECT pk FROM instances WHERE sop_uid = ?)", (record.sop_uid,))
                if db.execute(_IS_FIRST_OF_STUDY, params).fetchone()[0]:
                    db.execute(_SET_PATIENT_MODULE, params)
                    db.execute(_SET_STUDY_MODULE, params)
                if db.execute(_IS_FIRST_OF_SERIES, params).fetchone()[0]:
                    db.execute(_SET_SERIES_MODULE, params)
            return _differing_demographics(db, record)

    def patient_modules_to_read(self) -> list[tuple[str, list[str]]]:
        """(study UID, paths of its instances, first received first) of each study indexed
        before v8, whose patient module is still that of the first study of its Patient
        ID."""
        return [(row[0], json.loads(row[1])) for row in self.fetch(
            """SELECT st.study_uid, (SELECT json_group_array(path) FROM
                                     (SELECT i.path FROM instances i JOIN series se
                                      ON i.series_pk = se.pk WHERE se.study_pk = st.pk
                                      ORDER BY i.pk))
               FROM patient_modules_to_read r JOIN studies st ON st.pk = r.study_pk""")]

    def set_patient_module(self, study_uid: str, record: InstanceRecord | None) -> None:
        """The patient module of a study from ``record`` (its first readable instance; None:
        keep it as it is), which ``patient_modules_to_read`` no longer lists."""
        with self.transaction() as db:
            if record is not None:
                db.execute(_SET_PATIENT_MODULE, {**asdict(record), "study_uid": study_uid})
            db.execute("""DELETE FROM patient_modules_to_read WHERE study_pk =
                          (SELECT pk FROM studies WHERE study_uid = ?)""", (study_uid,))

    def has_path(self, path: str) -> bool:
        """True when an indexed instance, of any study, has its file at ``path``."""
        return bool(self.fetch("SELECT 1 FROM instances WHERE path = ?", (path,)))

    def study_paths(self, study_uid: str) -> set[str]:
        """Relative paths of every indexed instance of a study."""
        with self._lock:
            rows = self._db.execute(
                """SELECT i.path FROM instances i JOIN series se ON i.series_pk = se.pk
                   JOIN studies st ON se.study_pk = st.pk WHERE st.study_uid = ?""",
                (study_uid,)).fetchall()
        return {row[0] for row in rows}

    def search(self, level: Level, matches: list[Match], returned: list[str], fuzzy: bool,
               limit: int, offset: int, within: frozenset[str] | None = None
               ) -> list[dict[str, object]]:
        """QIDO matching, see ``storage.search.search``."""
        with self._lock:
            rows = search(self._db, level, matches, returned, fuzzy, limit, offset, within)
        return with_request_items(rows)  # JSON decoding, once the lock is released

    def count(self, level: Level, matches: list[Match], fuzzy: bool,
              within: frozenset[str] | None = None) -> int:
        """How many results a QIDO search has in all, see ``storage.search.count``."""
        with self._lock:
            return count(self._db, level, matches, fuzzy, within)

    def patient_id_of(self, study_uid: str) -> str:
        """The Patient ID of a study ("" when the study is unknown)."""
        rows = self.fetch("""SELECT p.patient_id FROM studies st JOIN patients p
                             ON st.patient_pk = p.pk WHERE st.study_uid = ?""", (study_uid,))
        return rows[0][0] if rows else ""

    def list_studies(self, study_uid: str | None = None) -> list[StudySummary]:
        """Every stored study (or only ``study_uid``) with its counts, most recent study
        date first."""
        where, parameters = ("WHERE st.study_uid = ?", (study_uid,)) if study_uid else ("", ())
        with self._lock:
            rows = self._db.execute(_STUDY_SUMMARY.format(where=where), parameters).fetchall()
        return [
            StudySummary(*row[:8], modalities=sorted((row[8] or "").split(",")) if row[8] else [],
                         series_count=row[9], instance_count=row[10])
            for row in rows
        ]
