"""The storage package on real files and a real index database (SQLite and PostgreSQL)."""

import dataclasses
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import sqlalchemy
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from storage.blobs import BlobStore, InvalidUIDError
from storage.database import Database, DatabaseURLError, masked
from storage.database import database_url as url_of_index
from storage.header import read_header
from storage.index import Index
from storage.migrations import head
from storage.part10 import dataset_offset, read_file_meta
from storage.recovery import recover
from storage.schema import MIGRATIONS
from storage.search import Level, Match, fold_name
from storage.store import Outcome, Rejection, Store
from storage.structure import IngestLimits
from storage.summaries import series_summaries, study_summaries
from storage.uids import is_valid_uid
from tests.old_index import downgrade_to_baseline
from tests.postgres import PostgresCluster
from tests.processes import REPO, PasserelleProcess, free_port
from tests.scu import associate
from tests.synthetic import ct_slice, part10


@pytest.mark.parametrize("uid, valid", [
    ("1.2.840.10008.5.1.4.1.1.2", True),
    ("1.2.840.0.1", True),
    ("2.25.329800735698586629295641978511506172918", True),
    ("1." + "2" * 62, True),  # 64 characters
    ("1." + "2" * 63, False),  # 65 characters
    ("", False),
    ("1..2", False),
    (".1.2", False),
    ("1.2.", False),
    ("1.2.a", False),
    ("../../etc/passwd", False),
    ("/etc/passwd", False),
    ("1.2\x003", False),
    ("1.2 ", False),
])
def test_uid_validation(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_blob_paths_refuse_unsafe_uids(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    assert blobs.relative_path("1.2", "1.3", "1.4") == "studies/1.2/1.3/1.4.dcm"
    with pytest.raises(InvalidUIDError, match="Series"):
        blobs.relative_path("1.2", "..", "1.4")


def test_interrupted_write_leaves_neither_file_nor_temp(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    relative = blobs.relative_path("1.2", "1.3", "1.4")
    blobs.put(relative, [b"first version"])

    def failing_chunks():
        yield b"second version, partly"
        raise OSError("connection lost")

    with pytest.raises(OSError, match="connection lost"):
        blobs.put(relative, failing_chunks())
    assert blobs.read(relative) == b"first version"
    assert list(blobs.tmp_dir.iterdir()) == []


def test_leftover_temp_files_are_purged(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    (tmp_path / "tmp" / "abc.part").write_bytes(b"half")
    assert blobs.purge_temporary() == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_dataset_offset_with_and_without_group_length(tmp_path: Path) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    with_length = dataset_offset(raw)
    assert raw[with_length:with_length + 4] == b"\x08\x00\x16\x00"
    # Same file without (0002,0000): the walk over group 2 finds the same boundary.
    without = raw[:132] + raw[144:]
    assert dataset_offset(without) == with_length - 12


def test_index_schema_is_created_then_reopened(database_url: str) -> None:
    index = Index(Database(database_url))
    assert index.schema_version == head()
    index.close()
    reopened = Index(Database(database_url))
    assert reopened.schema_version == head()
    reopened.close()


def test_store_indexes_every_level(tmp_path: Path, database_url: str) -> None:
    store = Store(tmp_path, database_url=database_url)
    study, series = generate_uid(), generate_uid()
    for number in (1, 2):
        ds = ct_slice(study, series, 1, number, size=4)
        ins = Dataset()
        ins.PatientID = "1234567890123"
        ins.IssuerOfPatientID = "1.2.250.1.213.1.4.8"
        ins.TypeOfPatientID = "TEXT"
        qualifier = Dataset()
        qualifier.UniversalEntityID = "1.2.250.1.213.1.4.8"
        qualifier.UniversalEntityIDType = "ISO"
        ins.IssuerOfPatientIDQualifiersSequence = [qualifier]
        ds.OtherPatientIDsSequence = [ins]
        ris = Dataset()
        ris.LocalNamespaceEntityID = "RIS"
        ris.UniversalEntityID = "1.2.250.1.71.4.2.1"
        ris.UniversalEntityIDType = "ISO"
        ds.IssuerOfAccessionNumberSequence = [ris]
        ds.PlacerOrderNumberImagingServiceRequest = "ORDER42"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        result = store.ingest(buffer.getvalue(), source="TEST")
        assert result.outcome is Outcome.STORED
    [summary] = study_summaries(store.index)
    assert (summary.series_count, summary.instance_count) == (1, 2)
    assert result.record is not None
    assert result.record.placer_order_numbers == '["ORDER42"]'
    assert json.loads(result.record.other_patient_ids) == [{
        "id": "1234567890123", "type": "TEXT", "issuer": {
            "local": "1.2.250.1.213.1.4.8", "universal": "1.2.250.1.213.1.4.8",
            "universal_type": "ISO"}}]
    assert json.loads(result.record.accession_issuer) == {
        "local": "RIS", "universal": "1.2.250.1.71.4.2.1", "universal_type": "ISO"}
    stored = store.index.find_instance(result.record.sop_uid)
    assert stored is not None
    assert dcmread(tmp_path / stored.path).InstanceNumber == 2
    store.close()


def test_file_meta_written_for_received_data_sets_is_valid(tmp_path: Path) -> None:
    from pydicom.filereader import read_file_meta_info

    from storage.part10 import IMPLEMENTATION_CLASS_UID, file_preamble_and_meta

    raw = file_preamble_and_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.4.50",
                                 "CT1")
    assert dataset_offset(raw) == len(raw)
    (tmp_path / "meta.dcm").write_bytes(raw)
    meta = read_file_meta_info(tmp_path / "meta.dcm")
    assert meta.MediaStorageSOPInstanceUID == "1.2.3"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle == "CT1"
    assert meta.FileMetaInformationGroupLength == len(raw) - 144


def test_migration_from_v1_folds_existing_names(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "index.sqlite")
    for statement in MIGRATIONS[0].split(";"):
        db.execute(statement)
    db.execute("INSERT INTO patients VALUES (1, 'P1', '', '', 'MÜLLER^Hélène', '', 'F')")
    db.execute("INSERT INTO studies VALUES (1, '1.2.3', 1, '', '', '', '', '', '', '', '', '',"
               " 0, 0)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    index = Index(tmp_path / "index.sqlite")
    assert index.schema_version == head()
    rows = index.search(Level.STUDY, [Match("PatientName", "helene")], ["PatientID"],
                        fuzzy=True, limit=10, offset=0)
    assert rows == [{"PatientID": "P1"}]  # folded in v2, the study's own since v8
    index.close()


def test_fold_name() -> None:
    assert fold_name("MÜLLER^Hélène") == "^muller^helene"
    assert fold_name("Dupont-Durand^Jean Pierre=デュポン") == "^dupont^durand^jean^pierre^デュポン"
    assert fold_name("") == "^"


@pytest.mark.parametrize("stores", [1, 2])
def test_two_writers_of_one_sop_instance_uid_at_once(tmp_path: Path, database_url: str,
                                                     stores: int) -> None:
    """Keep-first under a race, of two threads of one Store or of two Stores on one data dir
    and one database (as two processes or replicas): one object stored, the other refused
    as a conflict, and the file on disk is the one the index describes."""
    first = Store(tmp_path / "data", database_url=database_url)
    writers = [first, first if stores == 1 else Store(tmp_path / "data",
                                                      database_url=database_url)]
    barrier = threading.Barrier(2)
    for _ in range(40):
        sop_uid, study, series = generate_uid(), generate_uid(), generate_uid()
        versions = [bytes(part10(ct_slice(study, series, 1, 1, size=8, sop_uid=sop_uid,
                                          PatientName=name))) for name in ("A^A", "B^B")]
        outcomes: list[Outcome] = []

        def write(store: Store, data: bytes) -> None:
            barrier.wait()
            outcomes.append(store.ingest(data, "race").outcome)  # noqa: B023

        threads = [threading.Thread(target=write, args=pair)
                   for pair in zip(writers, versions, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == sorted([Outcome.STORED, Outcome.REJECTED])
        stored = first.index.find_instance(sop_uid)
        assert first.blobs.read(stored.path) in versions
        [summary] = study_summaries(first.index, [study])
        assert summary.patient_name == dcmread(first.blobs.absolute(stored.path)).PatientName
    assert list(first.blobs.tmp_dir.iterdir()) == []
    for store in set(writers):
        store.close()


def _deflated_part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_deflated_header_is_read_as_pydicom_reads_it() -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 7, size=16, PatientName="Deflated^Dora")
    explicit = read_header(part10(ds))
    deflated = read_header(_deflated_part10(ds), IngestLimits())
    assert deflated == dataclasses.replace(explicit,
                                           transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert (deflated.patient_name, deflated.instance_number) == ("Deflated^Dora", 7)


def test_a_deflate_bomb_is_refused_before_it_is_inflated_in_memory(tmp_path: Path) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    ds.EncapsulatedDocument = bytes(64 << 20)  # 64 MiB of zeros: 64 KB deflated
    bomb = _deflated_part10(ds)
    del ds
    store = Store(tmp_path, limits=IngestLimits(max_instance_bytes=1 << 20))
    try:
        tracemalloc.start()
        result = store.ingest(bomb, "test")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert result.reason is Rejection.TOO_LARGE
        assert peak < 8 << 20, f"{peak / 1e6:.0f} MB allocated"
        # Within the limit, it is inflated into a scratch file, not in memory, either.
        store.limits = IngestLimits()
        tracemalloc.start()
        result = store.ingest(bomb, "test")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert result.outcome is Outcome.STORED
        assert peak < 8 << 20, f"{peak / 1e6:.0f} MB allocated"
        assert list(store.blobs.tmp_dir.iterdir()) == []
    finally:
        store.close()


def test_one_file_meta_walker_finds_the_transfer_syntax(tmp_path: Path) -> None:
    raw = _deflated_part10(ct_slice(generate_uid(), generate_uid(), 1, 1, size=4))
    meta = read_file_meta(io.BytesIO(raw))
    assert meta.transfer_syntax == DeflatedExplicitVRLittleEndian
    assert meta.dataset_offset == dataset_offset(raw)


# --- recovery over an index of earlier versions (review 3, findings 8 and 9) --------------

def _drop(store: Store, ds: Dataset) -> Path:
    """Write ``ds`` where its UIDs file it, unindexed (a file the index lost)."""
    path = store.blobs.absolute(store.blobs.relative_path(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10(ds))
    return path


def test_recovery_leaves_a_file_indexed_under_another_study_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before v8 an instance of series A.1 sent in study B was filed under studies/B/A.1/
    but indexed in study A. The upgrade reports it; recovery, seeing a file under study B
    that study B does not index, must not quarantine it (study A's row would point to no
    file)."""
    data = tmp_path / "data"
    store = Store(data)
    study_a, study_b, series = generate_uid(), generate_uid(), generate_uid()
    assert store.ingest(part10(ct_slice(study_a, series, 1, 1, size=4)), "t").accepted
    sent = ct_slice(study_b, series, 1, 2, size=4)
    misfiled = _drop(store, sent)
    relative = str(misfiled.relative_to(data))
    store.close()
    downgrade_to_baseline(data / "index.sqlite")
    db = sqlite3.connect(data / "index.sqlite")  # as the version before v8 left it
    db.execute("INSERT INTO instances (sop_uid, series_pk, sop_class_uid, transfer_syntax,"
               " path, size, source, received_at) VALUES (?, 1, ?, ?, ?, ?, 'old', 0)",
               (sent.SOPInstanceUID, sent.SOPClassUID, sent.file_meta.TransferSyntaxUID,
                relative, misfiled.stat().st_size))
    db.execute("DROP INDEX IF EXISTS instances_path")
    db.execute("DROP TABLE alembic_version")
    db.execute("PRAGMA user_version = 9")  # before the path index
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, logger="storage.schema"):
        store = Store(data)
    try:
        assert f"instance {sent.SOPInstanceUID} is indexed in study {study_a}" in caplog.text
        assert relative in caplog.text
        report = recover(store.blobs, store.index)
        assert report.counts() == {"reindexed": 0, "quarantined": 0, "missing": 0}
        assert misfiled.exists()
        assert store.index.find_instance(sent.SOPInstanceUID).path == relative
        assert recover(store.blobs, store.index).counts()["missing"] == 0
    finally:
        store.close()


def test_quarantined_files_of_one_sop_instance_uid_are_all_kept(tmp_path: Path,
                                                               database_url: str) -> None:
    """Files of an identity conflict share their SOP Instance UID, hence their name: each
    is kept in quarantine/, none overwrites another."""
    store = Store(tmp_path / "data", database_url=database_url)
    try:
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        assert store.ingest(part10(ct_slice(study, series, 1, 1, size=4, patient_id="P1")),
                            "t").accepted
        dropped = [_drop(store, ct_slice(study, other, 1, 2, size=4, patient_id="P2",
                                         sop_uid=sop, SeriesDescription=other))
                   for other in (generate_uid(), generate_uid(), generate_uid())]
        report = recover(store.blobs, store.index)
        assert report.counts()["quarantined"] == 3
        kept = sorted((tmp_path / "data" / "quarantine").iterdir())
        assert [path.name for path in kept] == [f"{sop}.1.dcm", f"{sop}.2.dcm", f"{sop}.dcm"]
        assert {dcmread(path).SeriesDescription for path in kept} == {
            path.parent.name for path in dropped}
    finally:
        store.close()


# --- the index's database, as `passerelle` commands are given it ----------------------------

def _passerelle(data_dir: Path, database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PASSERELLE_DATA_DIR": str(data_dir),
           "PASSERELLE_DATABASE_URL": database_url}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_serve_stores_in_the_postgresql_database_of_its_setting(
        tmp_path: Path, postgres_cluster: PostgresCluster) -> None:
    """PASSERELLE_DATABASE_URL=postgresql://...: a C-STORE is indexed in that database (no
    SQLite file in the data dir), the CLI reads it there, the log names the database with
    its password masked, and its connections are named in pg_stat_activity."""
    url = postgres_cluster.new_database().replace("postgres@", "postgres:s3cret@")
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4)
    data = tmp_path / "data"
    with PasserelleProcess(data, database_url=url) as server:
        assoc = associate(server.dicom_port, [ds])
        try:
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        with psycopg.connect(url) as connection:  # its connections are named
            assert connection.execute("SELECT count(*) FROM pg_stat_activity"
                                      " WHERE application_name = 'passerelle'").fetchone()[0]
        log = server.log()
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT sop_uid FROM instances").fetchall()
    assert rows == [(ds.SOPInstanceUID,)]
    assert not (data / "index.sqlite").exists()
    assert "index database: postgresql://postgres:***@127.0.0.1:" in log
    assert "s3cret" not in log
    listed = _passerelle(data, url, "studies", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [study["study_uid"] for study in json.loads(listed.stdout)] == [ds.StudyInstanceUID]


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    """No server at the URL: each command says it cannot open the index database (password
    masked), no traceback."""
    url = f"postgresql://passerelle:s3cret@127.0.0.1:{free_port()}/passerelle"
    (tmp_path / "data").mkdir()
    for command in (("studies",), ("serve",)):
        result = _passerelle(tmp_path / "data", url, *command)
        assert result.returncode == 1, command
        assert "cannot open the index database postgresql://passerelle:***@127.0.0.1:" in \
            result.stderr, command
        assert "Traceback" not in result.stderr
        assert "s3cret" not in result.stderr


@pytest.mark.parametrize("url", ["mysql://user@host/db", "not a url", "sqlite://"])
def test_a_database_url_of_another_kind_is_refused_at_start(tmp_path: Path, url: str) -> None:
    result = _passerelle(tmp_path / "data", url, "studies")
    assert result.returncode == 2
    assert "database_url (PASSERELLE_DATABASE_URL)" in result.stderr
    assert "postgresql://user@host:port/database" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_index_query_on_each_dialect(tmp_path: Path, database_url: str) -> None:
    """The Index API over one study of two series (CT, MR) on each dialect: the instances
    of a study, a series, an instance, within a set of UIDs; the cached metadata (replaced
    when cached again) and its size; paths; the study list; the patient module to read."""
    store = Store(tmp_path / "data", database_url=database_url)
    index = store.index
    try:
        study, ct, mr = generate_uid(), generate_uid(), generate_uid()
        slices = [ct_slice(study, ct, 1, 2, size=4, patient_id="PID-7"),
                  ct_slice(study, ct, 1, 1, size=4, patient_id="PID-7"),
                  ct_slice(study, mr, 2, 1, size=4, patient_id="PID-7", Modality="MR")]
        for ds in slices:
            assert store.ingest(part10(ds), "test").outcome is Outcome.STORED
        uids = [ds.SOPInstanceUID for ds in slices]
        assert [i.sop_uid for i in index.instances(study)] == [uids[1], uids[0], uids[2]]
        assert [i.sop_uid for i in index.instances(study, mr)] == [uids[2]]
        assert [i.sop_uid for i in index.instances(study, ct, uids[0])] == [uids[0]]
        within = frozenset({uids[0], uids[2], generate_uid()})
        assert [i.sop_uid for i in index.instances(study, within=within)] == [uids[0], uids[2]]
        assert index.instances(study, within=frozenset()) == []
        index.cache_metadata([(uids[0], '{"a": 1}'), (uids[2], "{}")])
        index.cache_metadata([(uids[0], '{"a": 12}')])
        cached = {i.sop_uid: text for i, text in index.instances_with_metadata(study)}
        assert cached == {uids[0]: '{"a": 12}', uids[1]: None, uids[2]: "{}"}
        assert index.cached_metadata_size(study) == len('{"a": 12}{}')
        assert index.cached_metadata_size(study, within=frozenset({uids[2]})) == 2
        paths = index.study_paths(study)
        assert len(paths) == 3 and all(index.has_path(path) for path in paths)
        assert not index.has_path("studies/elsewhere.dcm")
        assert index.patient_id_of(study) == "PID-7"
        assert index.patient_id_of(generate_uid()) == ""
        [summary] = study_summaries(index, [study])
        assert (summary.modalities, summary.series_count, summary.instance_count) == (
            ["CT", "MR"], 2, 3)
        assert study_summaries(index, [generate_uid()]) == []
        assert study_summaries(index, []) == []
        [series_ct, series_mr] = series_summaries(index, study)
        assert (series_ct.series_uid, series_ct.instance_count, series_mr.modality) == (
            ct, 2, "MR")
        assert series_ct.size + series_mr.size == summary.size == sum(
            len(store.blobs.read(path)) for path in paths)
        stored = index.find_instance(uids[2])
        assert (stored.series_uid, stored.frames) == (mr, 1)
        assert stored.size == len(store.blobs.read(stored.path))
        assert isinstance(stored.received_at, float)
        with index.transaction() as db:  # as a study indexed before v8 is listed
            db.execute(sqlalchemy.text("INSERT INTO patient_modules_to_read"
                                       " SELECT pk FROM studies"))
        assert index.patient_modules_to_read() == [
            (study, [index.find_instance(uid).path for uid in uids])]
        index.set_patient_module(study, None)
        assert index.patient_modules_to_read() == []
    finally:
        store.close()


def test_database_urls_and_their_dialect(tmp_path: Path) -> None:
    """Empty: the SQLite file of the data dir; postgresql:// (or postgres://,
    postgresql+psycopg://) on psycopg 3; a password never shown."""
    assert url_of_index("", tmp_path) == f"sqlite:///{(tmp_path / 'index.sqlite').resolve()}"
    assert url_of_index("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"
    for url in ("postgresql://u@h:5433/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"):
        database = Database(url)  # no connection until used
        assert (database.dialect, database.engine.driver) == ("postgresql", "psycopg")
        database.close()
    assert masked("postgresql://u:s3cret@h/db") == "postgresql://u:***@h/db"
    with pytest.raises(DatabaseURLError, match="unsupported database URL 'mysql://u:\\*\\*\\*@h"):
        Database("mysql://u:s3cret@h/db")


def test_many_concurrent_writers_never_run_out_of_connections(tmp_path: Path,
                                                              database_url: str) -> None:
    """More writers at once than the index pools connections (each holds its instance lock
    while it takes others): every instance stored."""
    store = Store(tmp_path / "data", database_url=database_url)
    try:
        study = generate_uid()
        items = [bytes(part10(ct_slice(study, generate_uid(), 1, 1, size=8)))
                 for _ in range(48)]
        barrier = threading.Barrier(len(items))

        def write(data: bytes) -> Outcome:
            barrier.wait()
            return store.ingest(data, "crowd").outcome

        with ThreadPoolExecutor(len(items)) as pool:
            outcomes = list(pool.map(write, items))
        assert outcomes == [Outcome.STORED] * len(items)
        assert study_summaries(store.index, [study])[0].instance_count == len(items)
    finally:
        store.close()


def test_recovery_quarantines_a_file_of_a_rejected_instance(tmp_path: Path) -> None:
    """A file written back for an instance an IOCM note has rejected meanwhile is not
    re-indexed after an unclean stop: it is never shown again."""
    store = Store(tmp_path / "data")
    try:
        rejected = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4)
        with store.index.transaction() as db:
            db.execute(sqlalchemy.text(
                "INSERT INTO rejected_instances (sop_uid, study_uid, series_uid, reason,"
                " note_uid, rejected_at) VALUES (:sop, :study, :series, '113037', :note, 0)"),
                {"sop": rejected.SOPInstanceUID, "study": rejected.StudyInstanceUID,
                 "series": rejected.SeriesInstanceUID, "note": generate_uid()})
        path = _drop(store, rejected)
        report = recover(store.blobs, store.index)
        assert report.counts()["reindexed"] == 0 and len(report.quarantined) == 1
        assert not path.exists()
        assert store.index.find_instance(rejected.SOPInstanceUID) is None
    finally:
        store.close()
