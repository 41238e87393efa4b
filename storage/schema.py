"""The index's schema history before Alembic: the SQLite migrations of versions 1 to 11
(PRAGMA user_version), which bring an index left by those versions to the schema of the
Alembic baseline (storage/migrations), and what that upgrade reports."""

import logging
import sqlite3

from storage.identifiers import encode
from storage.search import request_items

log = logging.getLogger(__name__)

# Each entry migrates the schema from version N to N+1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE patients (
        pk INTEGER PRIMARY KEY,
        patient_id TEXT NOT NULL,
        issuer_of_patient_id TEXT NOT NULL,
        other_patient_ids TEXT NOT NULL,
        patient_name TEXT NOT NULL,
        patient_birth_date TEXT NOT NULL,
        patient_sex TEXT NOT NULL,
        UNIQUE (patient_id, issuer_of_patient_id)
    );
    CREATE TABLE studies (
        pk INTEGER PRIMARY KEY,
        study_uid TEXT NOT NULL UNIQUE,
        patient_pk INTEGER NOT NULL REFERENCES patients(pk),
        study_date TEXT NOT NULL,
        study_time TEXT NOT NULL,
        accession_number TEXT NOT NULL,
        accession_issuer TEXT NOT NULL,
        study_id TEXT NOT NULL,
        study_description TEXT NOT NULL,
        referring_physician TEXT NOT NULL,
        requested_procedure_ids TEXT NOT NULL,
        placer_order_numbers TEXT NOT NULL,
        first_received_at REAL NOT NULL,
        last_received_at REAL NOT NULL
    );
    CREATE INDEX studies_patient ON studies(patient_pk);
    CREATE INDEX studies_date ON studies(study_date);
    CREATE INDEX studies_accession ON studies(accession_number);
    CREATE TABLE series (
        pk INTEGER PRIMARY KEY,
        series_uid TEXT NOT NULL UNIQUE,
        study_pk INTEGER NOT NULL REFERENCES studies(pk),
        modality TEXT NOT NULL,
        series_number INTEGER,
        series_description TEXT NOT NULL,
        body_part TEXT NOT NULL,
        series_date TEXT NOT NULL,
        series_time TEXT NOT NULL
    );
    CREATE INDEX series_study ON series(study_pk);
    CREATE TABLE instances (
        pk INTEGER PRIMARY KEY,
        sop_uid TEXT NOT NULL UNIQUE,
        series_pk INTEGER NOT NULL REFERENCES series(pk),
        sop_class_uid TEXT NOT NULL,
        instance_number INTEGER,
        transfer_syntax TEXT NOT NULL,
        rows INTEGER,
        columns INTEGER,
        frames INTEGER,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        source TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances(series_pk);
    """,
    # v2: accent- and case-folded person names for QIDO fuzzy matching; patient id lookups.
    """
    ALTER TABLE patients ADD COLUMN patient_name_folded TEXT NOT NULL DEFAULT '';
    UPDATE patients SET patient_name_folded = fold_name(patient_name);
    ALTER TABLE studies ADD COLUMN referring_physician_folded TEXT NOT NULL DEFAULT '';
    UPDATE studies SET referring_physician_folded = fold_name(referring_physician);
    CREATE INDEX patients_id ON patients(patient_id);
    """,
    # v3: DICOM JSON of each instance, computed on the first metadata request.
    """
    CREATE TABLE instance_metadata (
        instance_pk INTEGER PRIMARY KEY REFERENCES instances(pk) ON DELETE CASCADE,
        json TEXT NOT NULL
    );
    """,
    # v4: publication of KOS manifests. A study is queued once it has been quiet for the
    # stable delay (queued_through = its last_received_at when queued); the outbox row
    # carries the manifest through to the registry's answer.
    """
    ALTER TABLE studies ADD COLUMN queued_through REAL;
    CREATE TABLE publications (
        pk INTEGER PRIMARY KEY,
        study_uid TEXT NOT NULL,
        action TEXT NOT NULL,
        kos_uid TEXT NOT NULL,
        replaces_kos_uid TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        response TEXT NOT NULL DEFAULT '',
        document_id TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX publications_state ON publications(state, next_attempt_at);
    CREATE INDEX publications_study ON publications(study_uid);
    """,
    # v5: parameters of an outbox row (the labels of a confidentiality update, as JSON);
    # manifests looked up by uniqueId (access through a KOS).
    """
    ALTER TABLE publications ADD COLUMN payload TEXT NOT NULL DEFAULT '';
    CREATE INDEX publications_kos ON publications(kos_uid);
    """,
    # v6: what QIDO-RS returns "if known" (PS3.18 Tables 10.6.3-3/4/5) from the instances:
    # taken from an instance's cached DICOM JSON where it has one, empty otherwise until the
    # instance is received again. UPDATE ... FROM: SQLite 3.33 (MIN_SQLITE, checked by Index).
    """
    ALTER TABLE instances ADD COLUMN timezone_offset TEXT NOT NULL DEFAULT '';
    ALTER TABLE instances ADD COLUMN bits_allocated INTEGER;
    ALTER TABLE instances ADD COLUMN pps_start_date TEXT NOT NULL DEFAULT '';
    ALTER TABLE instances ADD COLUMN pps_start_time TEXT NOT NULL DEFAULT '';
    ALTER TABLE instances ADD COLUMN request_attributes TEXT NOT NULL DEFAULT '';
    UPDATE instances SET
        timezone_offset = COALESCE(json_extract(m.json, '$."00080201".Value[0]'), ''),
        bits_allocated = json_extract(m.json, '$."00280100".Value[0]'),
        pps_start_date = COALESCE(json_extract(m.json, '$."00400244".Value[0]'), ''),
        pps_start_time = COALESCE(json_extract(m.json, '$."00400245".Value[0]'), ''),
        request_attributes = COALESCE(NULLIF((
            SELECT json_group_array(json_array(
                COALESCE(json_extract(item.value, '$."00400009".Value[0]'), ''),
                COALESCE(json_extract(item.value, '$."00401001".Value[0]'), '')))
            FROM json_each(m.json, '$."00400275".Value') item), '[]'), '')
    FROM instance_metadata m WHERE m.instance_pk = instances.pk;
    """,
    # v7: what a manifest repeats as received: the requests of each series, identifiers
    # kept paired (Request Attributes Sequence), and the character set of the study's text.
    """
    ALTER TABLE series ADD COLUMN requests TEXT NOT NULL DEFAULT '';
    ALTER TABLE studies ADD COLUMN character_set TEXT NOT NULL DEFAULT '';
    """,
    # v8: the patient module of each study is its own (from its first instance), no longer
    # that of the first study ever received under the Patient ID; the patient row keeps
    # only the identifier. Studies of earlier versions start from what they were shown with,
    # until Store reads the patient module of each again from its first instance.
    """
    ALTER TABLE studies ADD COLUMN other_patient_ids TEXT NOT NULL DEFAULT '';
    ALTER TABLE studies ADD COLUMN patient_name TEXT NOT NULL DEFAULT '';
    ALTER TABLE studies ADD COLUMN patient_name_folded TEXT NOT NULL DEFAULT '';
    ALTER TABLE studies ADD COLUMN patient_birth_date TEXT NOT NULL DEFAULT '';
    ALTER TABLE studies ADD COLUMN patient_sex TEXT NOT NULL DEFAULT '';
    UPDATE studies SET (other_patient_ids, patient_name, patient_name_folded, patient_birth_date,
                        patient_sex) =
        (SELECT p.other_patient_ids, p.patient_name, p.patient_name_folded,
                p.patient_birth_date, p.patient_sex
         FROM patients p WHERE p.pk = studies.patient_pk);
    ALTER TABLE patients DROP COLUMN other_patient_ids;
    ALTER TABLE patients DROP COLUMN patient_name;
    ALTER TABLE patients DROP COLUMN patient_name_folded;
    ALTER TABLE patients DROP COLUMN patient_birth_date;
    ALTER TABLE patients DROP COLUMN patient_sex;
    CREATE TABLE patient_modules_to_read (study_pk INTEGER PRIMARY KEY REFERENCES studies(pk));
    INSERT INTO patient_modules_to_read SELECT pk FROM studies;
    """,
    # v9: the universal id of each study's Patient ID authority (Issuer of Patient ID
    # Qualifiers Sequence), read again from the first instance of each study.
    """
    ALTER TABLE studies ADD COLUMN patient_id_qualifiers TEXT NOT NULL DEFAULT '';
    INSERT OR IGNORE INTO patient_modules_to_read SELECT pk FROM studies;
    """,
    # v10: instances looked up by path (recovery skips a file indexed under another study
    # than its directory's, as versions before v8 could file it).
    """
    CREATE INDEX instances_path ON instances(path);
    """,
    # v11: the Request Attributes of an instance kept as its distinct items, at most
    # storage.search.MAX_REQUEST_ITEMS of them (as ingest now keeps them).
    """
    UPDATE instances SET request_attributes = request_items_text(request_attributes)
    WHERE request_attributes != '';
    """,
)
LEGACY_VERSION = len(MIGRATIONS)  # the schema of the Alembic baseline
# An upgrade from before the path index (v10) reports the rows whose path and study disagree,
# as versions before v8 could file them.
PATH_INDEX_VERSION = 10


class NewerSchemaError(ValueError):
    """The index was left by a newer program than this one."""


def request_items_text(text: str) -> str:
    """A Request Attributes column (a JSON list of items) as its distinct items, bounded."""
    return encode(request_items([text]))


def migrate_legacy(db: sqlite3.Connection, version: int) -> None:
    """Bring ``db`` (inside a write transaction, with the index's SQL functions), at
    ``version``, to LEGACY_VERSION."""
    if version > LEGACY_VERSION:
        raise NewerSchemaError(f"index schema v{version} is newer than this program")
    db.create_function("request_items_text", 1, request_items_text, deterministic=True)
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {number}")
    if 0 < version < PATH_INDEX_VERSION:
        _report_misfiled(db)


def _report_misfiled(db: sqlite3.Connection) -> None:
    """Log the instances whose file is not where their indexed study and series put it:
    versions before v8 filed an instance under the study it was sent in while indexing it
    under the study its series was known in. Their rows and files are kept as they are (the
    file is served from its indexed path; recovery leaves it alone)."""
    rows = db.execute("""SELECT i.sop_uid, st.study_uid, se.series_uid, i.path
                          FROM instances i JOIN series se ON i.series_pk = se.pk
                          JOIN studies st ON se.study_pk = st.pk
                          WHERE i.path != 'studies/' || st.study_uid || '/' || se.series_uid
                                          || '/' || i.sop_uid || '.dcm'""").fetchall()
    for sop_uid, study_uid, series_uid, path in rows:
        log.warning("index upgrade: instance %s is indexed in study %s, series %s, but its"
                    " file is %s (filed by an earlier version under the study it was sent"
                    " in): check that study with its sender", sop_uid, study_uid, series_uid,
                    path)
    if rows:
        log.warning("index upgrade: %d instance(s) filed under another study than their"
                    " indexed one", len(rows))
