"""The index's schema migrations (storage/migrations, Alembic): a fresh database of each
dialect is created at head and matches storage/tables.py; SQLite indexes of the versions
before Alembic migrate in place and keep their data; replicas starting together on one empty
PostgreSQL database migrate it once."""

import multiprocessing
import multiprocessing.synchronize
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom.uid import generate_uid

from storage.database import Database
from storage.index import Index
from storage.migrations import head
from storage.outbox import Outbox
from storage.schema import LEGACY_VERSION, NewerSchemaError
from storage.search import name_group
from storage.summaries import study_summaries
from storage.tables import metadata
from tests.old_index import index_at_version
from tests.postgres import PostgresCluster


def _differences(database: Database) -> list:
    """What autogenerate would change to make the database match storage/tables.py."""
    # Server defaults compared on PostgreSQL only: SQLite reflects '' as the text "''".
    options = {"compare_type": True,
               "compare_server_default": database.dialect == "postgresql"}
    with database.engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection, opts=options), metadata)


def test_a_fresh_database_is_migrated_to_the_schema_of_the_tables(database_url: str) -> None:
    index = Index(Database(database_url))
    try:
        assert index.schema_version == head()
        assert _differences(index.database) == []
        assert index.fetch("SELECT count(*) FROM alembic_version")[0][0] == 1
    finally:
        index.close()
    reopened = Index(Database(database_url))  # at head: nothing to do
    assert reopened.schema_version == head()
    reopened.close()


_NAMES = ["", "=", "Doe^John", " Doe^John^^^ ", "Doe^John =山田^太郎=やまだ", "==phonetic^ ^",
          "a=b=c=d", "^^ ", "Müller^Hélène  = "]


def test_name_group_in_sql_is_the_python_one(database_url: str) -> None:
    """QIDO's name matching calls name_group in SQL: SQLite's is storage.search.name_group,
    PostgreSQL's the function of the baseline migration; they agree."""
    index = Index(Database(database_url))
    try:
        for name in _NAMES:
            [row] = index.fetch("SELECT name_group(:name, 0), name_group(:name, 1),"
                                " name_group(:name, 2), name_group(:name, 3)", {"name": name})
            assert tuple(row) == tuple(name_group(name, group) for group in range(4)), name
    finally:
        index.close()


def _legacy_index(path: Path, version: int) -> tuple[str, str]:
    """An SQLite index as version ``version`` left it, holding one study of one instance;
    its (study UID, SOP Instance UID)."""
    study, sop = generate_uid(), generate_uid()
    db = index_at_version(path, version)
    patient = ("(pk, patient_id, issuer_of_patient_id) VALUES (1, 'P1', '')" if version >= 8
               else "VALUES (1, 'P1', '', '', 'DOE^JANE', '', 'F', '^doe^jane')")
    db.execute(f"INSERT INTO patients {patient}")
    db.execute("INSERT INTO studies (pk, study_uid, patient_pk, study_date, study_time,"
               " accession_number, accession_issuer, study_id, study_description,"
               " referring_physician, requested_procedure_ids, placer_order_numbers,"
               " first_received_at, last_received_at) VALUES"
               " (1, ?, 1, '20240102', '', 'ACC1', '', '', '', '', '', '', 1.5, 2.5)", (study,))
    db.execute("INSERT INTO series (pk, series_uid, study_pk, modality, series_description,"
               " body_part, series_date, series_time) VALUES (1, ?, 1, 'CT', '', '', '', '')",
               (generate_uid(),))
    db.execute("INSERT INTO instances (sop_uid, series_pk, sop_class_uid, transfer_syntax,"
               " path, size, source, received_at) VALUES (?, 1, '1.2.840.10008.5.1.4.1.1.2',"
               " '1.2.840.10008.1.2.1', 'studies/x.dcm', 10, 'old', 3.25)", (sop,))
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    return study, sop


@pytest.mark.parametrize("version", [5, LEGACY_VERSION])
def test_an_sqlite_index_of_a_version_before_alembic_migrates_in_place(
        tmp_path: Path, version: int) -> None:
    """user_version 5: the legacy migrations up to 11 run, then the baseline is stamped;
    user_version 11: stamped only. The study and its instance are kept, and the index
    takes new instances."""
    path = tmp_path / "index.sqlite"
    study, sop = _legacy_index(path, version)
    index = Index(path)
    try:
        assert index.schema_version == head()
        [summary] = study_summaries(index)
        assert (summary.study_uid, summary.accession_number, summary.instance_count) == (
            study, "ACC1", 1)
        stored = index.find_instance(sop)
        assert (stored.study_uid, stored.path, stored.received_at) == (
            study, "studies/x.dcm", 3.25)
        [(user_version,)] = index.fetch("PRAGMA user_version")
        assert user_version == LEGACY_VERSION
        assert index.fetch("SELECT version_num FROM alembic_version")[0][0] == head()
        with index.transaction() as db:  # the legacy schema takes the index's statements
            db.exec_driver_sql("INSERT INTO patient_modules_to_read VALUES (1)"
                               " ON CONFLICT DO NOTHING")
        assert index.patient_modules_to_read() == [(study, ["studies/x.dcm"])]
    finally:
        index.close()


def test_a_study_queued_and_unchanged_stays_so_through_the_change_counts(
        tmp_path: Path) -> None:
    """Migration 0004: a study queued at its last instance's time is up to date; one
    changed since it was queued, or never queued, is queued once quiet."""
    path = tmp_path / "index.sqlite"
    changed, _ = _legacy_index(path, LEGACY_VERSION)
    db = sqlite3.connect(path)
    db.execute("UPDATE studies SET queued_through = 2.0")  # before its last, at 2.5
    db.execute("INSERT INTO studies (pk, study_uid, patient_pk, study_date, study_time,"
               " accession_number, accession_issuer, study_id, study_description,"
               " referring_physician, requested_procedure_ids, placer_order_numbers,"
               " first_received_at, last_received_at, queued_through) VALUES"
               " (2, '1.2.3', 1, '', '', '', '', '', '', '', '', '', 1.5, 2.5, 2.5)")
    db.commit()
    db.close()
    index = Index(path)
    try:
        assert Outbox(index).queue_stable_studies(0, now=10.0) == [changed]
    finally:
        index.close()


def test_an_index_left_by_a_newer_program_is_refused(tmp_path: Path) -> None:
    """An Alembic revision this program does not know, or a user_version past the legacy
    ones without Alembic: refused by name, nothing changed."""
    newer = tmp_path / "newer.sqlite"
    Index(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE alembic_version SET version_num = '0999_future'")
    with pytest.raises(NewerSchemaError, match="revision 0999_future is newer"):
        Index(newer)
    legacy = tmp_path / "legacy.sqlite"
    with sqlite3.connect(legacy) as db:
        db.execute(f"PRAGMA user_version = {LEGACY_VERSION + 1}")
    with pytest.raises(NewerSchemaError, match=f"v{LEGACY_VERSION + 1} is newer"):
        Index(legacy)
    with sqlite3.connect(legacy) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == []


def _open_index(url: str, barrier: multiprocessing.synchronize.Barrier,
                errors: multiprocessing.Queue) -> None:
    """One replica starting: waits for the others, then opens the index."""
    barrier.wait()
    try:
        Index(Database(url)).close()
    except Exception as exc:  # reported to the test, whatever it is
        errors.put(f"{type(exc).__name__}: {exc}")
        raise


def test_replicas_starting_together_on_an_empty_database_migrate_it_once(
        postgres_cluster: PostgresCluster) -> None:
    """Four processes open the index on one empty PostgreSQL database at the same instant:
    none fails, and there is one set of tables and one alembic_version row."""
    url = postgres_cluster.new_database()
    spawn = multiprocessing.get_context("spawn")
    barrier, errors = spawn.Barrier(4), spawn.Queue()
    replicas = [spawn.Process(target=_open_index, args=(url, barrier, errors))
                for _ in range(4)]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join(120)
    reported = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert reported == []
    assert [replica.exitcode for replica in replicas] == [0, 0, 0, 0]
    database = Database(url)
    try:
        assert database.fetch("SELECT version_num FROM alembic_version") == [(head(),)]
        tables = {row[0] for row in database.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert tables == {*metadata.tables, "alembic_version"}
        assert _differences(database) == []
    finally:
        database.close()
