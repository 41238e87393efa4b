"""QIDO-RS at scale: ``/studies?PatientID=`` and a one-month StudyDate range over an index of
``--studies`` studies (100 000 by default), on SQLite and on PostgreSQL.

The index is filled directly (Core inserts of storage.tables in batches, no files: QIDO
answers from the index only) with a spread a hospital's archive has: ten years of study
dates, about 2.5 studies a patient (some patients with many more), a modality mix, 1 to 3
series a study and 1 to 4 instances a series. Then a real ``passerelle serve``
(tests/processes.py) runs on it, SQLite in its data dir or a throwaway PostgreSQL cluster
(tests/postgres.py), and each query is sent ``--runs`` times over HTTP (one keep-alive
client, one request at a time), each time for another patient or month, with the default
return attributes (the computed Modalities in Study and Numbers of Related Series and
Instances among them) and ``limit=100``. Prints p50 and p95 in milliseconds.

Usage: python bench/qido_scale.py [--studies 100000] [--runs 200] [--dialects sqlite,postgresql]
                                  [--quick]
"""

import argparse
import datetime
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from common import markdown_table  # puts the repository on sys.path
from sqlalchemy import Connection, insert, text

from storage import tables
from storage.database import Database, database_url
from storage.index import Index
from storage.search import fold_name
from tests.postgres import PostgresCluster
from tests.processes import PasserelleProcess

FAMILY = ["MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "RICHARD", "PETIT", "DURAND",
          "LEROY", "MOREAU", "SIMON", "LAURENT", "LEFÈVRE", "MICHEL", "GARCIA", "DAVID",
          "BERTRAND", "ROUX", "VINCENT", "FOURNIER", "MOREL", "GIRARD", "ANDRÉ", "MERCIER",
          "DUPONT", "LAMBERT", "BONNET", "FRANÇOIS", "MARTINEZ", "LEGRAND", "MÜLLER", "NGUYEN"]
GIVEN = ["JEAN", "MARIE", "PIERRE", "NATHALIE", "MICHEL", "ISABELLE", "PHILIPPE", "SYLVIE",
         "ALAIN", "CATHERINE", "NICOLAS", "FRANÇOISE", "LOUIS", "CHLOÉ", "LÉA", "HUGO"]
# A study's main modality, weighted about as a general hospital's case mix, with the SOP
# Class of its images.
MODALITIES = {"CR": (22, "1.2.840.10008.5.1.4.1.1.1"), "DX": (14, "1.2.840.10008.5.1.4.1.1.1.1"),
              "CT": (20, "1.2.840.10008.5.1.4.1.1.2"), "MR": (12, "1.2.840.10008.5.1.4.1.1.4"),
              "US": (14, "1.2.840.10008.5.1.4.1.1.6.1"),
              "MG": (6, "1.2.840.10008.5.1.4.1.1.1.2"), "XA": (4, "1.2.840.10008.5.1.4.1.1.12.1"),
              "NM": (3, "1.2.840.10008.5.1.4.1.1.20"), "PT": (3, "1.2.840.10008.5.1.4.1.1.128"),
              "OT": (2, "1.2.840.10008.5.1.4.1.1.7")}
EXTRA_SERIES = {"SR": "1.2.840.10008.5.1.4.1.1.88.22", "PR": "1.2.840.10008.5.1.4.1.1.11.1",
                "KO": "1.2.840.10008.5.1.4.1.1.88.59"}
FIRST_DAY = datetime.date(2016, 1, 1)
DAYS = 3653  # ten years of studies
UID_ROOT = "1.2.826.0.1.3680043.10.1016"
BATCH = 5000  # studies inserted per statement batch


def patient_id(number: int) -> str:
    """The Patient ID of patient ``number``: nine digits, not in insertion order."""
    return f"{(number * 7919 + 1000003) % 1000000000:09d}"


def patient_count(studies: int) -> int:
    """About 2.5 studies a patient."""
    return max(1, studies * 2 // 5)


def _patient_of(rng: random.Random, patients: int) -> int:
    """Most studies are of any patient; a fifth are of the twentieth followed for years."""
    if rng.random() < 0.2:
        return rng.randrange(max(1, patients // 20))
    return rng.randrange(patients)


def _name(number: int) -> str:
    return f"{FAMILY[number % len(FAMILY)]}^{GIVEN[number // len(FAMILY) % len(GIVEN)]}"


def _patient_rows(patients: int) -> list[dict[str, object]]:
    return [{"pk": k + 1, "patient_id": patient_id(k), "issuer_of_patient_id": "HOSP"}
            for k in range(patients)]


def _study_rows(first: int, last: int, patients: int, now: float
                ) -> Iterator[tuple[str, dict[str, object], list[dict[str, object]],
                                    list[dict[str, object]]]]:
    """For each study number in [first, last): its table and its rows (study, series,
    instances), drawn from a generator seeded by the number (a fill is reproducible)."""
    weights = [weight for weight, _ in MODALITIES.values()]
    for number in range(first, last):
        rng = random.Random(number)
        patient = _patient_of(rng, patients)
        modality = rng.choices(list(MODALITIES), weights)[0]
        study_uid = f"{UID_ROOT}.{number}"
        day = FIRST_DAY + datetime.timedelta(days=rng.randrange(DAYS))
        name = _name(patient)
        referring = _name(rng.randrange(400))
        study = {"pk": number, "study_uid": study_uid, "patient_pk": patient + 1,
                 "study_date": day.strftime("%Y%m%d"),
                 "study_time": f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}"
                               f"{rng.randrange(60):02d}",
                 "accession_number": f"A{number:09d}", "accession_issuer": "",
                 "study_id": str(number % 10000), "study_description": f"{modality} EXAM",
                 "referring_physician": referring,
                 "referring_physician_folded": fold_name(referring),
                 "requested_procedure_ids": "[]", "placer_order_numbers": "[]",
                 "first_received_at": now, "last_received_at": now,
                 "changes": 1, "queued_changes": 1,
                 "character_set": "ISO_IR 192", "other_patient_ids": "[]",
                 "patient_name": name, "patient_name_folded": fold_name(name),
                 "patient_birth_date": f"{1930 + patient % 90}{1 + patient % 12:02d}"
                                       f"{1 + patient % 28:02d}",
                 "patient_sex": "MF"[patient % 2], "patient_id_qualifiers": ""}
        series, instances = [], []
        for s in range(1, rng.choice((1, 1, 2, 2, 3)) + 1):
            kind = modality if s == 1 or rng.random() < 0.6 else rng.choice(list(EXTRA_SERIES))
            sop_class = MODALITIES[kind][1] if kind in MODALITIES else EXTRA_SERIES[kind]
            series_pk = number * 4 + s
            series_uid = f"{study_uid}.{s}"
            series.append({"pk": series_pk, "series_uid": series_uid, "study_pk": number,
                           "modality": kind, "series_number": s,
                           "series_description": f"{kind} {s}", "body_part": "",
                           "series_date": study["study_date"], "series_time": "",
                           "requests": "[]"})
            for i in range(1, rng.randrange(1, 5) + 1):
                sop_uid = f"{series_uid}.{i}"
                instances.append({
                    "pk": series_pk * 8 + i, "sop_uid": sop_uid, "series_pk": series_pk,
                    "sop_class_uid": sop_class, "instance_number": i,
                    "transfer_syntax": "1.2.840.10008.1.2.1", "rows": 512, "columns": 512,
                    "frames": 1, "path": f"studies/{study_uid}/{series_uid}/{sop_uid}.dcm",
                    "size": 524288, "source": "BENCH", "received_at": now,
                    "timezone_offset": "+0100", "bits_allocated": 16, "pps_start_date": "",
                    "pps_start_time": "", "request_attributes": ""})
        yield study_uid, study, series, instances


def fill(conn: Connection, studies: int) -> None:
    """Insert ``studies`` studies (and their patients, series, instances) into an empty
    index, then let the planner know the tables (ANALYZE, as autovacuum would)."""
    patients = patient_count(studies)
    conn.execute(insert(tables.patients), _patient_rows(patients))
    now = time.time()
    for first in range(1, studies + 1, BATCH):
        rows = list(_study_rows(first, min(first + BATCH, studies + 1), patients, now))
        conn.execute(insert(tables.studies), [study for _, study, _, _ in rows])
        conn.execute(insert(tables.series), [s for _, _, series, _ in rows for s in series])
        conn.execute(insert(tables.instances), [i for *_, instances in rows for i in instances])
    if conn.dialect.name == "postgresql":
        # The identities go on after the rows given their pk (a service may ingest more).
        for table in ("patients", "studies", "series", "instances"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'),"
                              f" (SELECT max(pk) FROM {table}))"))
    conn.execute(text("ANALYZE"))


def queries(studies: int, runs: int) -> dict[str, list[dict[str, str]]]:
    """The parameters of each measured request: ``runs`` patients drawn among those of the
    studies (a study's patient: as often as they have studies), ``runs`` months."""
    rng = random.Random(16)
    patients = patient_count(studies)
    by_patient = [patient_id(_patient_of(random.Random(rng.randrange(1, studies + 1)),
                                         patients)) for _ in range(runs)]
    months = []
    for _ in range(runs):
        day = FIRST_DAY + datetime.timedelta(days=rng.randrange(DAYS - 31))
        first = day.replace(day=1)
        last = (first + datetime.timedelta(days=31)).replace(day=1) - datetime.timedelta(days=1)
        months.append(f"{first:%Y%m%d}-{last:%Y%m%d}")
    return {"`/studies?PatientID=`": [{"PatientID": p, "limit": "100"} for p in by_patient],
            "`/studies?StudyDate=` one month": [{"StudyDate": m, "limit": "100"}
                                                for m in months]}


def measure(base_url: str, params: list[dict[str, str]]) -> tuple[float, float, float]:
    """p50 and p95 (ms) of the requests, and the median number of results."""
    times, results = [], []
    with httpx.Client(base_url=f"{base_url}/dicom-web", timeout=60,
                      headers={"Accept": "application/dicom+json"}) as client:
        for warm in params[:10]:  # connections, caches, the service's first requests
            client.get("/studies", params=warm).raise_for_status()
        for query in params:
            start = time.perf_counter()
            response = client.get("/studies", params=query)
            times.append(1000 * (time.perf_counter() - start))
            response.raise_for_status()
            results.append(len(response.json()))
    p95 = statistics.quantiles(times, n=20)[-1] if len(times) > 1 else times[0]
    return statistics.median(times), p95, statistics.median(results)


def run(dialect: str, work: Path, studies: int, runs: int, cluster: PostgresCluster | None
        ) -> list[list[str]]:
    """Fill an index on ``dialect``, serve it, and measure each query; the table's rows."""
    data_dir = work / dialect / "data"
    data_dir.mkdir(parents=True)
    url = cluster.new_database() if cluster else database_url("", data_dir)
    index = Index(Database(url))  # creates the schema (the migrations)
    try:
        start = time.perf_counter()
        with index.transaction() as conn:
            fill(conn, studies)
        print(f"{dialect}: {studies} studies filled in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    finally:
        index.close()
    settings = {"database_url": url} if cluster else {}
    rows = []
    with PasserelleProcess(data_dir, stable_seconds="86400", **settings) as server:
        for label, params in queries(studies, runs).items():
            p50, p95, found = measure(server.base_url, params)
            rows.append([dialect, f"{studies:,}".replace(",", " "), label, f"{found:g}",
                         f"{p50:.1f}", f"{p95:.1f}"])
    return rows


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100000)
    parser.add_argument("--runs", type=int, default=200, help="requests per query")
    parser.add_argument("--dialects", default="sqlite,postgresql")
    parser.add_argument("--quick", action="store_true", help="smoke size: 2 000 studies")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.runs = 2000, 20
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="passerelle-bench-qido-scale-") as work:
        for dialect in args.dialects.split(","):
            cluster = PostgresCluster() if dialect == "postgresql" else None
            try:
                rows += run(dialect, Path(work), args.studies, args.runs, cluster)
            finally:
                if cluster:
                    cluster.stop()
    print(f"QIDO-RS over HTTP through `passerelle serve`, {args.runs} requests per query"
          " (one at a time), default return attributes, limit=100:")
    print(markdown_table(["index", "studies", "query", "results (median)", "p50 ms",
                          "p95 ms"], rows))


if __name__ == "__main__":
    main()
