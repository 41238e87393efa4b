"""The QIDO-RS searches of the scale target (bench/qido_scale.py: a patient's studies, a month
of studies) are answered through indexes on SQLite and on PostgreSQL: each statement a request
runs, read again with EXPLAIN, reads no table nor index whole. On PostgreSQL sequential scans
are disfavoured (enable_seqscan off), so a plan still reading a table or an index whole has
no index to search: the plans do not depend on the few rows a test holds."""

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import event

from tests.inprocess import InProcessService
from tests.synthetic import ct_slice

JSON = {"Accept": "application/dicom+json"}
# Patient ID, accession, study date of each study.
STUDIES = [("PID100", "ACC100", "20250105"), ("PID101", "ACC101", "20250120"),
           ("PID200", "ACC200", "20250210")]


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory,
         module_new_database_url: Callable[[], str]) -> Iterator[InProcessService]:
    with InProcessService(tmp_path_factory.mktemp("qido-plans") / "data",
                          database_url=module_new_database_url()) as service:
        for patient, accession, date in STUDIES:
            study, series = generate_uid(), generate_uid()
            service.ingest_all(ct_slice(study, series, 1, n, size=4, patient_id=patient,
                                        accession=accession, StudyDate=date)
                               for n in (1, 2))
        yield service


def _plans(service: InProcessService, query: str) -> dict[str, list[str]]:
    """The statements ``/studies?{query}`` runs on the index, each with the steps of its
    plan (SQLite: EXPLAIN QUERY PLAN lines; PostgreSQL: "node type on relation using index",
    "whole" for a scan without an index condition)."""
    engine = service.store.index.database.engine
    statements: list[tuple[str, object]] = []

    def executed(_conn: object, _cursor: object, statement: str, parameters: object,
                 *_: object) -> None:
        if statement.lstrip().startswith(("SELECT", "WITH")):
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", executed)
    try:
        response = service.get(f"/dicom-web/studies?{query}", headers=JSON)
        assert response.status_code == 200, response.text
        assert response.json()
    finally:
        event.remove(engine, "before_cursor_execute", executed)
    plans = {}
    with engine.connect() as connection:
        cursor = connection.connection.cursor()
        for statement, parameters in statements:
            if engine.dialect.name == "sqlite":
                cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
                plans[statement] = [row[3] for row in cursor.fetchall()]
            else:
                cursor.execute("SET enable_seqscan = off")
                cursor.execute(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
                plans[statement] = list(_steps(cursor.fetchone()[0][0]["Plan"]))
    return plans


def _steps(node: dict[str, Any]) -> Iterator[str]:
    """The steps of a PostgreSQL plan that read a relation, depth first (a bitmap heap scan
    reads what its bitmap index scan found)."""
    if "Relation Name" in node or "Index Name" in node:
        whole = node["Node Type"] != "Bitmap Heap Scan" and "Index Cond" not in node
        yield (f"{node['Node Type']} on {node.get('Relation Name', '')}"
               f" using {node.get('Index Name', '')}{' whole' if whole else ''}")
    for child in node.get("Plans", []):
        yield from _steps(child)


def _whole_reads(steps: list[str]) -> list[str]:
    """The steps that read a table or an index whole (SQLite SCAN)."""
    return [step for step in steps if step.startswith("SCAN ") or step.endswith(" whole")]


@pytest.mark.parametrize("query", [
    "PatientID=PID101",
    "PatientID=PID1*",  # a prefix: a range of the index (PostgreSQL: in the "C" collation)
    "AccessionNumber=ACC2*",
    "StudyDate=20250101-20250131",
    "StudyDate=20250101-20250131&ModalitiesInStudy=CT",
])
def test_the_searches_of_the_target_read_no_table_whole(held: InProcessService,
                                                        query: str) -> None:
    """limit=1: the page is full, so the request also counts the matches (the Warning)."""
    plans = _plans(held, f"{query}&limit=1")
    assert len(plans) == 4  # the page, its series' and instances' values, the count
    for statement, steps in plans.items():
        assert not _whole_reads(steps), f"{statement}\n{steps}"


def test_counting_a_month_of_studies_reads_no_patient(held: InProcessService) -> None:
    """The count of a search on study attributes does not join the patients (each study has
    one): a month of 100 000 studies joined every patient on PostgreSQL (a hash join)."""
    [count] = [plan for statement, plan in
               _plans(held, "StudyDate=20250101-20250131&limit=1").items()
               if statement.startswith("SELECT count(*)")]
    assert not any(" patients " in f"{step} " or step.startswith(("SEARCH p ", "SCAN p "))
                   for step in count), count  # SQLite names the alias, PostgreSQL the table
    assert any("studies_date_time" in step for step in count), count


def test_the_most_recent_studies_are_read_in_order_from_the_index(
        held: InProcessService) -> None:
    """The first page of every study, most recent first: read from the (date, time) index,
    not sorted whole."""
    [page] = [plan for statement, plan in _plans(held, "limit=1").items()
              if "ORDER BY" in statement]
    assert any("studies_date_time" in step for step in page), page
    assert "USE TEMP B-TREE FOR ORDER BY" not in page, page


def test_the_statements_of_a_search_run_outside_any_transaction(
        held: InProcessService) -> None:
    """Each statement of a search is a read on its own: no BEGIN before nor ROLLBACK after
    them (two round trips to PostgreSQL for each connection taken, where READ COMMITTED
    gives each statement its own snapshot anyway)."""
    engine = held.store.index.database.engine
    states: list[bool] = []

    def executed(conn: Any, *_: object) -> None:
        driver = conn.connection.driver_connection
        states.append(driver.in_transaction if engine.dialect.name == "sqlite" else
                      driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)

    event.listen(engine, "before_cursor_execute", executed)
    try:
        response = held.get("/dicom-web/studies?PatientID=PID1*&limit=1", headers=JSON)
        assert response.status_code == 200, response.text
    finally:
        event.remove(engine, "before_cursor_execute", executed)
    assert states == [False] * 4  # the page, its series' and instances' values, the count
