"""The index of patients, studies, series and instances, on SQLite or PostgreSQL
(storage.database; its schema: storage.tables, migrated by storage.migrations).

Safe to share between threads and processes: each read takes a pooled connection, each write
one transaction (storage.database). ``add_instance`` stays correct when writers race on one
study from several processes or replicas: its upserts return the row they met, whose parents
are checked again before anything commits.
"""

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import Connection, Row, text
from sqlalchemy.exc import OperationalError

from storage.database import (
    Database,
    DatabaseUnavailableError,
    json_array_agg,
    json_values,
    masked,
    sqlite_url,
)
from storage.header import InstanceRecord
from storage.identifiers import encode
from storage.migrations import current_revision, upgrade
from storage.search import (
    Level,
    Match,
    count,
    fold_name,
    request_items,
    search,
    with_request_items,
)

# The oldest SQLite the index runs on: RETURNING (3.35.0), UPDATE ... FROM (3.33.0, the
# legacy migrations), ALTER TABLE DROP COLUMN (3.35.0), JSON functions built in. Debian 12
# has 3.40.1, Debian 13 3.46.1.
MIN_SQLITE = (3, 35, 0)

_PATIENT_UPSERT = text("""
    INSERT INTO patients (patient_id, issuer_of_patient_id)
    VALUES (:patient_id, :issuer_of_patient_id)
    ON CONFLICT (patient_id, issuer_of_patient_id) DO UPDATE SET patient_id = excluded.patient_id
    RETURNING pk
""")
# The patient module of a study is written by its first instance and kept (one truth per
# study: its QIDO answers and its manifest agree whatever arrives later). RETURNING the
# patient of the row met: another transaction may have created the study meanwhile.
_STUDY_UPSERT = text("""
    INSERT INTO studies (study_uid, patient_pk, study_date, study_time, accession_number,
                         accession_issuer, study_id, study_description, referring_physician,
                         requested_procedure_ids, placer_order_numbers, first_received_at,
                         last_received_at, referring_physician_folded, character_set,
                         other_patient_ids, patient_name, patient_name_folded, patient_birth_date,
                         patient_sex, patient_id_qualifiers, changes)
    VALUES (:study_uid, :patient_pk, :study_date, :study_time, :accession_number,
            :accession_issuer, :study_id, :study_description, :referring_physician,
            :requested_procedure_ids, :placer_order_numbers, :now, :now,
            :referring_physician_folded, :character_set, :other_patient_ids, :patient_name,
            :patient_name_folded, :patient_birth_date, :patient_sex, :patient_id_qualifiers, 1)
    ON CONFLICT (study_uid) DO UPDATE SET changes = studies.changes + 1,
        last_received_at = CASE WHEN excluded.last_received_at > studies.last_received_at
                           THEN excluded.last_received_at ELSE studies.last_received_at END
    RETURNING pk, patient_pk
""")
_SET_PATIENT_MODULE = text("""
    UPDATE studies SET other_patient_ids = :other_patient_ids, patient_name = :patient_name,
        patient_name_folded = :patient_name_folded, patient_birth_date = :patient_birth_date,
        patient_sex = :patient_sex, patient_id_qualifiers = :patient_id_qualifiers
    WHERE study_uid = :study_uid
""")
# The study and series modules are those of their first instance too; replacing it (a
# corrected re-send under duplicate_policy overwrite, fixed at the RIS) replaces them.
_SET_STUDY_MODULE = text("""
    UPDATE studies SET study_date = :study_date, study_time = :study_time,
        accession_number = :accession_number, accession_issuer = :accession_issuer,
        study_id = :study_id, study_description = :study_description,
        referring_physician = :referring_physician,
        referring_physician_folded = :referring_physician_folded,
        requested_procedure_ids = :requested_procedure_ids,
        placer_order_numbers = :placer_order_numbers, character_set = :character_set
    WHERE pk = :study_pk
""")
_SET_SERIES_MODULE = text("""
    UPDATE series SET modality = :modality, series_number = :series_number,
        series_description = :series_description, body_part = :body_part,
        series_date = :series_date, series_time = :series_time, requests = :requests
    WHERE pk = :series_pk
""")
# The first instance of a study (of a series) is its oldest row (a replaced instance keeps
# its row).
_IS_FIRST_OF_STUDY = text("""
    SELECT min(i.pk) = (SELECT pk FROM instances WHERE sop_uid = :sop_uid)
    FROM instances i JOIN series se ON i.series_pk = se.pk WHERE se.study_pk = :study_pk
""")
_IS_FIRST_OF_SERIES = text("""
    SELECT min(pk) = (SELECT pk FROM instances WHERE sop_uid = :sop_uid)
    FROM instances WHERE series_pk = :series_pk
""")
_SERIES_UPSERT = text("""
    INSERT INTO series (series_uid, study_pk, modality, series_number, series_description,
                        body_part, series_date, series_time, requests)
    VALUES (:series_uid, :study_pk, :modality, :series_number, :series_description,
            :body_part, :series_date, :series_time, :requests)
    ON CONFLICT (series_uid) DO UPDATE SET series_uid = excluded.series_uid
    RETURNING pk, study_pk
""")
# No row returned: the SOP Instance UID is stored in another series.
_INSTANCE_UPSERT = text("""
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
    WHERE instances.series_pk = excluded.series_pk
    RETURNING pk
""")
_CACHE_METADATA = text("""
    INSERT INTO instance_metadata (instance_pk, json)
    SELECT pk, :json FROM instances WHERE sop_uid = :sop_uid
    ON CONFLICT (instance_pk) DO UPDATE SET json = excluded.json
""")
_INSTANCE_COLUMNS = """i.sop_uid, st.study_uid, se.series_uid, i.path, i.size, i.sop_class_uid,
    i.transfer_syntax, i.frames, i.received_at"""
_INSTANCE_FROM = """FROM instances i JOIN series se ON i.series_pk = se.pk
    JOIN studies st ON se.study_pk = st.pk"""


def _instance_filter(dialect: str, study_uid: str, series_uid: str | None,
                     sop_uid: str | None, within: frozenset[str] | None
                     ) -> tuple[str, dict[str, object]]:
    """The WHERE clause (and its parameters) of the instances of a study, series or
    instance, only those ``within`` when given."""
    sql, params = " WHERE st.study_uid = :study_uid", {"study_uid": study_uid}
    if series_uid is not None:
        sql += " AND se.series_uid = :series_uid"
        params["series_uid"] = series_uid
    if sop_uid is not None:
        sql += " AND i.sop_uid = :sop_uid"
        params["sop_uid"] = sop_uid
    if within is not None:  # one parameter, however many UIDs
        sql += f" AND i.sop_uid IN ({json_values(dialect, 'within')})"
        params["within"] = json.dumps(sorted(within))
    return sql, params


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


# The messages name only what the sender sent (not the other patient).
def _instance_elsewhere(record: InstanceRecord) -> IdentityConflict:
    return IdentityConflict("SOPInstanceUID", "SOP Instance UID already stored in another"
                            f" series or study: {record.sop_uid}")


def _study_of_other_patient(record: InstanceRecord) -> IdentityConflict:
    return IdentityConflict("PatientID", "Study Instance UID already of another patient than"
                            " Patient ID "
                            f"{_qualified(record.patient_id, record.issuer_of_patient_id)}:"
                            f" {record.study_uid}")


def _series_of_other_study(record: InstanceRecord) -> IdentityConflict:
    return IdentityConflict("SeriesInstanceUID", "Series Instance UID already in another"
                            f" study than {record.study_uid}: {record.series_uid}")


def _identity_conflict(db: Connection, record: InstanceRecord) -> IdentityConflict | None:
    """The first way ``record`` contradicts the index: its SOP Instance UID stored in
    another series or study, its study under another Patient ID or issuer, its series in
    another study."""
    row = db.execute(text(f"SELECT se.series_uid, st.study_uid {_INSTANCE_FROM}"
                          " WHERE i.sop_uid = :sop_uid"), {"sop_uid": record.sop_uid}).first()
    if row and tuple(row) != (record.series_uid, record.study_uid):
        return _instance_elsewhere(record)
    row = db.execute(text("""SELECT p.patient_id, p.issuer_of_patient_id FROM studies st
                             JOIN patients p ON st.patient_pk = p.pk
                             WHERE st.study_uid = :study_uid"""),
                     {"study_uid": record.study_uid}).first()
    if row and tuple(row) != (record.patient_id, record.issuer_of_patient_id):
        return _study_of_other_patient(record)
    row = db.execute(text("""SELECT st.study_uid FROM series se JOIN studies st
                             ON se.study_pk = st.pk WHERE se.series_uid = :series_uid"""),
                     {"series_uid": record.series_uid}).first()
    if row and row[0] != record.study_uid:
        return _series_of_other_study(record)
    return None


# The patient module a study keeps from its first instance: column -> keyword.
_DEMOGRAPHICS = {"patient_name": "PatientName", "patient_birth_date": "PatientBirthDate",
                 "patient_sex": "PatientSex", "other_patient_ids": "OtherPatientIDsSequence"}


def _differing_demographics(db: Connection, record: InstanceRecord) -> list[str]:
    """The patient module attributes in which ``record`` differs from its (known) study."""
    row = db.execute(text(f"SELECT {', '.join(_DEMOGRAPHICS)} FROM studies"
                          " WHERE study_uid = :study_uid"),
                     {"study_uid": record.study_uid}).first()
    if row is None:
        return []
    return [keyword for (column, keyword), kept in zip(_DEMOGRAPHICS.items(), row, strict=True)
            if getattr(record, column) != kept]


def _record_params(record: InstanceRecord) -> dict[str, object]:
    """The bound parameters of ``record``, with its names folded for fuzzy matching."""
    return {**asdict(record), "patient_name_folded": fold_name(record.patient_name),
            "referring_physician_folded": fold_name(record.referring_physician)}


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


class UnsupportedSQLiteError(ValueError):
    """The SQLite library Python runs with is older than MIN_SQLITE."""


class Index:
    """The SQL index. Safe to share between threads."""

    def __init__(self, database: Database | Path) -> None:
        if isinstance(database, Path):
            database = Database(sqlite_url(database))
        if database.dialect == "sqlite" and sqlite3.sqlite_version_info < MIN_SQLITE:
            raise UnsupportedSQLiteError(
                f"SQLite {sqlite3.sqlite_version} is older than"
                f" {'.'.join(map(str, MIN_SQLITE))}, the oldest the index runs on: run"
                " Python with a newer SQLite library (Debian 12 or later has one)")
        self.database = database
        self.dialect = database.dialect
        try:
            upgrade(database)
        except OperationalError as exc:
            database.close()
            raise DatabaseUnavailableError(f"cannot open the index database"
                                           f" {masked(database.url)}: {exc.orig}") from exc
        except BaseException:
            database.close()
            raise

    def close(self) -> None:
        """Close the database connections."""
        self.database.close()

    @property
    def schema_version(self) -> str:
        """The schema revision applied (storage/migrations)."""
        with self.database.engine.connect() as connection:
            return current_revision(connection)

    def transaction(self) -> AbstractContextManager[Connection]:
        """A write transaction (``Database.transaction``)."""
        return self.database.transaction()

    def fetch(self, sql: str, params: Mapping[str, object] | None = None) -> list[Row]:
        """Rows of one read-only statement (for the storage modules built on the index)."""
        return self.database.fetch(sql, params)

    def find_instance(self, sop_uid: str) -> StoredInstance | None:
        """The stored instance with this SOP Instance UID, if any."""
        rows = self.fetch(f"SELECT {_INSTANCE_COLUMNS} {_INSTANCE_FROM}"
                          " WHERE i.sop_uid = :sop_uid", {"sop_uid": sop_uid})
        return StoredInstance(*rows[0]) if rows else None

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
        where, params = _instance_filter(self.dialect, study_uid, series_uid, sop_uid, within)
        sql = ("SELECT COALESCE(SUM(LENGTH(m.json)), 0) " + _INSTANCE_FROM +
               " JOIN instance_metadata m ON m.instance_pk = i.pk" + where)
        return int(self.fetch(sql, params)[0][0])

    def _instances(self, study_uid: str, series_uid: str | None, sop_uid: str | None,
                   within: frozenset[str] | None, with_metadata: bool
                   ) -> list[tuple[StoredInstance, str | None]]:
        sql = (f"SELECT {_INSTANCE_COLUMNS}, m.json {_INSTANCE_FROM}"
               " LEFT JOIN instance_metadata m ON m.instance_pk = i.pk" if with_metadata else
               f"SELECT {_INSTANCE_COLUMNS}, NULL {_INSTANCE_FROM}")
        where, params = _instance_filter(self.dialect, study_uid, series_uid, sop_uid, within)
        sql += where + " ORDER BY se.series_number, se.pk, i.instance_number, i.pk"
        return [(StoredInstance(*row[:-1]), row[-1]) for row in self.fetch(sql, params)]

    def cache_metadata(self, items: list[tuple[str, str]]) -> None:
        """Remember the DICOM JSON text of instances, given as (SOP Instance UID, JSON)."""
        if not items:
            return
        with self.transaction() as db:
            db.execute(_CACHE_METADATA, [{"json": json_text, "sop_uid": sop_uid}
                                         for sop_uid, json_text in items])

    def identity_conflict(self, record: InstanceRecord) -> IdentityConflict | None:
        """How ``record`` contradicts the index (None: it can be indexed as it says)."""
        with self.database.engine.connect() as connection:
            return _identity_conflict(connection, record)

    def add_instance(self, record: InstanceRecord, path: str, size: int, source: str,
                     replacing: bool = False) -> list[str]:
        """Insert (or, ``replacing``, update) an instance with its series, study and patient,
        in one commit; IdentityConflictError, nothing written, when ``identity_conflict``
        finds one. The patient and study modules of a study are those of its first instance,
        a series' attributes those of its first: replacing that instance replaces them.
        Returns the patient module attributes in which the instance differs from its
        study's."""
        params = _record_params(record)
        params.update(path=path, size=size, source=source,
                      # its distinct items, bounded
                      request_attributes=encode(request_items([record.request_attributes])))
        with self.transaction() as db:
            params["now"] = self.database.now(db)
            conflict = _identity_conflict(db, record)
            if conflict:
                raise IdentityConflictError(conflict)
            # Checked again on the rows each upsert meets: on PostgreSQL another transaction
            # may have created the study, series or instance since the check (they lock it
            # until this one ends, so what they return is what commits).
            params["patient_pk"] = db.execute(_PATIENT_UPSERT, params).scalar_one()
            params["study_pk"], patient_pk = db.execute(_STUDY_UPSERT, params).one()
            if patient_pk != params["patient_pk"]:
                raise IdentityConflictError(_study_of_other_patient(record))
            params["series_pk"], study_pk = db.execute(_SERIES_UPSERT, params).one()
            if study_pk != params["study_pk"]:
                raise IdentityConflictError(_series_of_other_study(record))
            if db.execute(_INSTANCE_UPSERT, params).first() is None:
                raise IdentityConflictError(_instance_elsewhere(record))
            if replacing:  # the cached metadata described the previous object
                db.execute(text("DELETE FROM instance_metadata WHERE instance_pk ="
                                " (SELECT pk FROM instances WHERE sop_uid = :sop_uid)"), params)
                if db.execute(_IS_FIRST_OF_STUDY, params).scalar_one():
                    db.execute(_SET_PATIENT_MODULE, params)
                    db.execute(_SET_STUDY_MODULE, params)
                if db.execute(_IS_FIRST_OF_SERIES, params).scalar_one():
                    db.execute(_SET_SERIES_MODULE, params)
            return _differing_demographics(db, record)

    def patient_modules_to_read(self) -> list[tuple[str, list[str]]]:
        """(study UID, paths of its instances, first received first) of each study indexed
        before v8, whose patient module is still that of the first study of its Patient
        ID."""
        paths = json_array_agg(self.dialect, "ordered.path")
        return [(row[0], json.loads(row[1])) for row in self.fetch(
            f"""SELECT st.study_uid, (SELECT {paths} FROM
                                      (SELECT i.path FROM instances i JOIN series se
                                       ON i.series_pk = se.pk WHERE se.study_pk = st.pk
                                       ORDER BY i.pk) AS ordered)
                FROM patient_modules_to_read r JOIN studies st ON st.pk = r.study_pk""")]

    def set_patient_module(self, study_uid: str, record: InstanceRecord | None) -> None:
        """The patient module of a study from ``record`` (its first readable instance; None:
        keep it as it is), which ``patient_modules_to_read`` no longer lists."""
        with self.transaction() as db:
            if record is not None:
                db.execute(_SET_PATIENT_MODULE, {**_record_params(record),
                                                 "study_uid": study_uid})
            db.execute(text("""DELETE FROM patient_modules_to_read WHERE study_pk =
                               (SELECT pk FROM studies WHERE study_uid = :study_uid)"""),
                       {"study_uid": study_uid})

    def has_path(self, path: str) -> bool:
        """True when an indexed instance, of any study, has its file at ``path``."""
        return bool(self.fetch("SELECT 1 FROM instances WHERE path = :path", {"path": path}))

    def study_paths(self, study_uid: str) -> set[str]:
        """Relative paths of every indexed instance of a study."""
        rows = self.fetch("""SELECT i.path FROM instances i JOIN series se
                             ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk
                             WHERE st.study_uid = :study_uid""", {"study_uid": study_uid})
        return {row[0] for row in rows}

    def file_restored(self, sop_uid: str, size: int, transfer_syntax: str) -> None:
        """An instance's file written back (``Store``: its local copy had been removed):
        its size and syntax as received again; in another syntax, its cached metadata is
        read again from it."""
        params = {"size": size, "syntax": transfer_syntax, "sop_uid": sop_uid}
        with self.transaction() as db:
            db.execute(text("DELETE FROM instance_metadata WHERE instance_pk = (SELECT pk"
                            " FROM instances WHERE sop_uid = :sop_uid"
                            " AND transfer_syntax <> :syntax)"), params)
            db.execute(text("UPDATE instances SET size = :size, transfer_syntax = :syntax"
                            " WHERE sop_uid = :sop_uid"), params)

    def copy_state(self, study_uid: str) -> tuple[float | None, str]:
        """When the study's local copy was removed (None: it is here) and the AE title of
        the PACS confirmed to hold it ("" when none is)."""
        rows = self.fetch("SELECT copy_removed_at, copy_held_by FROM studies"
                          " WHERE study_uid = :study_uid", {"study_uid": study_uid})
        return (rows[0][0], rows[0][1]) if rows else (None, "")

    def copy_restored(self, study_uid: str) -> None:
        """Every file of the study is here again: its local copy is no longer removed."""
        with self.transaction() as db:
            db.execute(text("UPDATE studies SET copy_removed_at = NULL"
                            " WHERE study_uid = :study_uid"), {"study_uid": study_uid})

    def search(self, level: Level, matches: list[Match], returned: list[str], fuzzy: bool,
               limit: int, offset: int, within: frozenset[str] | None = None
               ) -> list[dict[str, object]]:
        """QIDO matching, see ``storage.search.search``."""
        with self._reading() as connection:
            rows = search(connection, level, matches, returned, fuzzy, limit, offset, within)
        return with_request_items(rows)  # JSON decoding, once the connection is returned

    def count(self, level: Level, matches: list[Match], fuzzy: bool,
              within: frozenset[str] | None = None) -> int:
        """How many results a QIDO search has in all, see ``storage.search.count``."""
        with self._reading() as connection:
            return count(connection, level, matches, fuzzy, within)

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A pooled connection for reads; on PostgreSQL without BEGIN and ROLLBACK around
        them (two round trips: READ COMMITTED gives each statement its own snapshot anyway).
        """
        with self.database.engine.connect() as connection:
            if self.dialect == "postgresql":
                connection.execution_options(isolation_level="AUTOCOMMIT")
            yield connection

    def patient_id_of(self, study_uid: str) -> str:
        """The Patient ID of a study ("" when the study is unknown)."""
        rows = self.fetch("""SELECT p.patient_id FROM studies st JOIN patients p
                             ON st.patient_pk = p.pk WHERE st.study_uid = :study_uid""",
                          {"study_uid": study_uid})
        return rows[0][0] if rows else ""
