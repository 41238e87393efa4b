"""QIDO-RS return sets against the standard's own tables (PS3.18 10.6.3.3, Tables 10.6.3-3,
-4 and -5, copied below as data), and paging past the server's maximum (PS3.18 8.3.4.4.1),
through the application in-process, on an SQLite and on a PostgreSQL index."""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import event

import storage.index
from storage.header import read_header
from storage.identifiers import Request
from storage.index import Index, UnsupportedSQLiteError
from storage.search import MAX_REQUEST_ITEMS, Level
from tests.inprocess import InProcessService
from tests.old_index import index_at_version
from tests.synthetic import ct_slice, part10
from tests.test_access_model import publish

# (tag, Type, Condition) rows of PS3.18 Tables 10.6.3-3 (study), 10.6.3-4 (series) and
# 10.6.3-5 (instance). Type: R required, U unique key, C conditional; "known": "Shall be
# present if known"; "retrievable": "Shall be present if the Instance is retrievable by the
# Retrieve transaction".
STUDY_TABLE = [
    ("00080020", "R", ""),  # Study Date
    ("00080030", "R", ""),  # Study Time
    ("00080050", "R", ""),  # Accession Number
    ("00080056", "C", "known"),  # Instance Availability
    ("00080061", "R", ""),  # Modalities in Study
    ("00080090", "R", ""),  # Referring Physician's Name
    ("00080201", "C", "known"),  # Timezone Offset From UTC
    ("00081190", "C", "retrievable"),  # Retrieve URL
    ("00100010", "R", ""),  # Patient's Name
    ("00100020", "R", ""),  # Patient ID
    ("00100030", "R", ""),  # Patient's Birth Date
    ("00100040", "R", ""),  # Patient's Sex
    ("0020000D", "U", ""),  # Study Instance UID
    ("00200010", "R", ""),  # Study ID
    ("00201206", "R", ""),  # Number of Study Related Series
    ("00201208", "R", ""),  # Number of Study Related Instances
]
SERIES_TABLE = [
    ("00080060", "R", ""),  # Modality
    ("00080201", "C", "known"),  # Timezone Offset From UTC
    ("0008103E", "C", "known"),  # Series Description
    ("00081190", "R", "retrievable"),  # Retrieve URL
    ("0020000E", "U", ""),  # Series Instance UID
    ("00200011", "R", ""),  # Series Number
    ("00201209", "R", ""),  # Number of Series Related Instances
    ("00400244", "C", "known"),  # Performed Procedure Step Start Date
    ("00400245", "C", "known"),  # Performed Procedure Step Start Time
    ("00400275", "C", "known"),  # Request Attributes Sequence
]
REQUEST_ITEM_TABLE = [
    ("00400009", "R", ""),  # >Scheduled Procedure Step ID
    ("00401001", "R", ""),  # >Requested Procedure ID
]
INSTANCE_TABLE = [
    ("00080016", "R", ""),  # SOP Class UID
    ("00080018", "U", ""),  # SOP Instance UID
    ("00080056", "C", "known"),  # Instance Availability
    ("00080201", "C", "known"),  # Timezone Offset From UTC
    ("00081190", "R", "retrievable"),  # Retrieve URL
    ("00200013", "R", ""),  # Instance Number
    ("00280010", "C", "known"),  # Rows
    ("00280011", "C", "known"),  # Columns
    ("00280100", "C", "known"),  # Bits Allocated
    ("00280008", "C", "known"),  # Number of Frames
]

# The values the instances of the "known" study carry, as DICOM JSON values.
KNOWN = {
    "00080056": ["ONLINE"],  # everything the gateway holds is on its disk
    "00080201": ["+0100"],
    "00400244": ["20260110"],
    "00400245": ["101000"],
    "00280100": [16],
}
REQUESTS = [("SPS-1", "RP-1"), ("SPS-2", "RP-1")]
JSON = {"Accept": "application/dicom+json"}


def _requested(sps: str, rp: str) -> Dataset:
    item = Dataset()
    item.ScheduledProcedureStepID = sps
    item.RequestedProcedureID = rp
    item.AccessionNumber = "ACC-K"
    return item


def _known(study: str, series: str, number: int) -> Dataset:
    return ct_slice(study, series, 1, number, size=4, patient_id="PK", accession="ACC-K",
                    TimezoneOffsetFromUTC="+0100", PerformedProcedureStepStartDate="20260110",
                    PerformedProcedureStepStartTime="101000",
                    RequestAttributesSequence=[_requested(*r) for r in REQUESTS])


def _unknown(study: str, series: str) -> Dataset:
    """An instance with none of the conditional values: no time zone, procedure step,
    request, series description, nor pixel module."""
    ds = ct_slice(study, series, 1, 1, size=4, patient_id="PU", accession="ACC-U")
    for keyword in ("SeriesDescription", "PixelData", "Rows", "Columns", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
                    "PhotometricInterpretation", "RescaleIntercept", "RescaleSlope",
                    "PixelSpacing", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


@dataclass(frozen=True)
class Held:
    """The service and the studies it holds."""

    service: InProcessService
    study_k: str  # 2 series x 2 instances carrying every conditional value
    study_u: str  # 1 instance carrying none
    study_m: str  # 2 instances disagreeing on their time zone

    def get(self, url: str, **kwargs: object) -> httpx.Response:
        return self.service.get(url, **kwargs)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory,
        module_new_database_url: Callable[[], str]) -> Iterator[Held]:
    with InProcessService(tmp_path_factory.mktemp("qido-sets") / "data",
                          database_url=module_new_database_url()) as service:
        held = Held(service, generate_uid(), generate_uid(), generate_uid())
        for series in (generate_uid(), generate_uid()):
            service.ingest_all(_known(held.study_k, series, n) for n in (1, 2))
        service.ingest(_unknown(held.study_u, generate_uid()))
        mixed = generate_uid()
        service.ingest_all(ct_slice(held.study_m, mixed, 1, n, size=4, patient_id="PM",
                                    accession="ACC-M", TimezoneOffsetFromUTC=offset)
                           for n, offset in ((1, "+0100"), (2, "+0200")))
        yield held


def _results(web: Held, path: str, **params: object) -> list[dict]:
    response = web.get(f"/dicom-web{path}", params=params, headers=JSON)
    assert response.status_code == 200, response.text
    return response.json()


def _check(result: dict, table: list[tuple[str, str, str]], known: bool) -> None:
    """``result`` has every attribute of ``table``: R and U always, C when known."""
    for tag, kind, condition in table:
        if kind in ("R", "U") or condition == "retrievable" or known:
            assert tag in result, f"{tag} ({kind} {condition}) missing from {result}"
        elif tag in result:  # not known: absent, never present without a value
            assert "Value" in result[tag], f"{tag} is {result[tag]}"
        if known and tag in KNOWN:
            assert result[tag]["Value"] == KNOWN[tag], (tag, result[tag])
    if known and any(tag == "00400275" for tag, _, _ in table):
        items = result["00400275"]["Value"]
        for item in items:
            assert all(tag in item for tag, _, _ in REQUEST_ITEM_TABLE), item
        assert [(i["00400009"]["Value"][0], i["00401001"]["Value"][0]) for i in items] \
            == REQUESTS


# Each resource of PS3.18 Table 10.6.1-1 with the tables its results follow (10.6.3.3.1-3:
# all series add the study's, all instances the study's and the series', a study's
# instances the series').
RESOURCES = [
    ("/studies", [STUDY_TABLE]),
    ("/series", [SERIES_TABLE, STUDY_TABLE]),
    ("/studies/{study}/series", [SERIES_TABLE]),
    ("/instances", [INSTANCE_TABLE, SERIES_TABLE, STUDY_TABLE]),
    ("/studies/{study}/instances", [INSTANCE_TABLE, SERIES_TABLE]),
    ("/studies/{study}/series/{series}/instances", [INSTANCE_TABLE]),
]


def _series_of(web: Held, study: str) -> str:
    return _results(web, f"/studies/{study}/series")[0]["0020000E"]["Value"][0]


@pytest.mark.parametrize("template, tables", RESOURCES)
def test_every_attribute_of_the_tables_when_the_instances_carry_it(
        web: Held, template: str, tables: list) -> None:
    path = template.format(study=web.study_k, series=_series_of(web, web.study_k))
    results = _results(web, path, PatientID="PK") if "{" not in template else \
        _results(web, path)
    assert results
    for result in results:
        for table in tables:
            # Series Description is known for K's series ("SERIES 1").
            _check(result, table, known=True)


@pytest.mark.parametrize("template, tables", RESOURCES)
def test_required_attributes_and_nothing_empty_when_unknown(
        web: Held, template: str, tables: list) -> None:
    path = template.format(study=web.study_u, series=_series_of(web, web.study_u))
    results = _results(web, path, PatientID="PU") if "{" not in template else \
        _results(web, path)
    assert len(results) == 1
    [result] = results
    for table in tables:
        _check(result, table, known=False)
    for tag in ("00080201", "00400244", "00400245", "00400275", "0008103E", "00280010",
                "00280011", "00280100", "00280008"):
        assert tag not in result, (tag, result[tag])
    if any(tag == "00080056" for table in tables for tag, _, _ in table):
        assert result["00080056"]["Value"] == ["ONLINE"]


@pytest.mark.parametrize("params, tag", [
    ({"includefield": "SeriesDescription"}, "0008103E"),
    ({"includefield": "0008103E"}, "0008103E"),
    ({"includefield": "TimezoneOffsetFromUTC"}, "00080201"),
    ({"includefield": "RequestAttributesSequence"}, "00400275"),
    ({"SeriesDescription": ""}, "0008103E"),  # a matching key, universal matching
    ({"SeriesDescription": "*"}, "0008103E"),
])
def test_an_attribute_the_query_names_is_returned_empty_when_unknown(
        web: Held, params: dict, tag: str) -> None:
    """PS3.18 8.3.4.3: an includefield is C-FIND universal matching (the attribute is to be
    returned, PS3.4 C.2.2.2.3); 10.6.3.3.2: the response shall contain the attributes passed
    as match or includefield parameters. Unknown, it is there without a Value (F.2.5)."""
    [result] = _results(web, f"/studies/{web.study_u}/series", **params)
    assert "Value" not in result[tag] and result[tag]["vr"] == ATTRIBUTE_VR[tag]
    [unnamed] = _results(web, f"/studies/{web.study_u}/series")
    assert tag not in unnamed  # only named: "if known" otherwise (Table 10.6.3-4)


ATTRIBUTE_VR = {"0008103E": "LO", "00080201": "SH", "00400275": "SQ"}


def test_a_time_zone_the_instances_disagree_on_is_not_the_study_s(
        web: Held) -> None:
    [study] = _results(web, "/studies", PatientID="PM")
    [series] = _results(web, f"/studies/{web.study_m}/series")
    assert "00080201" not in study and "00080201" not in series
    instances = _results(web, f"/studies/{web.study_m}/instances")
    assert sorted(i["00080201"]["Value"][0] for i in instances) == ["+0100", "+0200"]


def test_instance_level_values_are_the_instance_s_own(web: Held) -> None:
    [instance, *_] = _results(web, "/instances", PatientID="PK",
                              includefield="TimezoneOffsetFromUTC")
    assert instance["00080201"]["Value"] == ["+0100"]
    assert instance["00280100"] == {"vr": "US", "Value": [16]}
    assert instance["00400275"]["vr"] == "SQ"


@pytest.mark.parametrize("key", ["TimezoneOffsetFromUTC", "InstanceAvailability",
                                 "RequestAttributesSequence"])
def test_values_known_from_the_instances_are_returned_not_matched(
        web: Held, key: str) -> None:
    response = web.get(f"/dicom-web/series?{key}=x")
    assert response.status_code == 400
    assert f"{key} is returned, not matched" in response.text


def test_a_page_that_is_not_the_last_says_how_many_remain(web: Held) -> None:
    """PS3.18 8.3.4.4.1: remaining > 0 gives a Warning; the last page has none."""
    response = web.get("/dicom-web/series", params={"limit": 1}, headers=JSON)
    assert len(response.json()) == 1
    assert response.headers["Warning"] == \
        '299 passerelle.test "There are 3 additional results that can be requested"'
    last = web.get("/dicom-web/series", params={"limit": 1, "offset": 3}, headers=JSON)
    assert len(last.json()) == 1 and "Warning" not in last.headers


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory,
            module_new_database_url: Callable[[], str]) -> Iterator[InProcessService]:
    """One series of 1 002 instances: more than the server's default page of 1 000."""
    with InProcessService(tmp_path_factory.mktemp("qido-max") / "data",
                          database_url=module_new_database_url()) as service:
        study, series = generate_uid(), generate_uid()
        service.ingest_all(ct_slice(study, series, 1, n, size=2) for n in range(1, 1003))
        yield service


@pytest.mark.parametrize("params, returned, remaining", [
    ({}, 1000, 2),  # cut by the server's page
    ({"offset": 1000}, 2, None),
    ({"limit": 20000}, 1002, None),  # above maxResults: cut to it, not refused
    ({"limit": 5, "offset": 990}, 5, 7),
    ({"limit": 10, "offset": 995}, 7, None),
    ({"limit": 0}, 0, 1002),
    ({"offset": 5000}, 0, None),
])
def test_a_result_cut_by_the_server_s_maximum_has_a_warning(
        crowded: InProcessService, params: dict, returned: int, remaining: int | None) -> None:
    response = crowded.get("/dicom-web/instances", params=params, headers=JSON)
    assert response.status_code == 200
    assert len(response.json()) == returned
    if remaining is None:
        assert "Warning" not in response.headers
    else:
        assert response.headers["Warning"] == (f'299 passerelle.test "There are {remaining}'
                                               ' additional results that can be requested"')


def test_an_index_of_a_previous_version_takes_the_values_from_cached_metadata(
        tmp_path: Path) -> None:
    """The migration that adds the columns fills them from an instance's cached DICOM JSON;
    an instance without one has them empty (absent from QIDO) until received again."""
    cached = {"00080201": {"vr": "SH", "Value": ["-0500"]},
              "00280100": {"vr": "US", "Value": [8]},
              "00400244": {"vr": "DA", "Value": ["20250101"]},
              "00400245": {"vr": "TM", "Value": ["0800"]},
              "00400275": {"vr": "SQ", "Value": [
                  {"00400009": {"vr": "SH", "Value": ["S1"]},
                   "00401001": {"vr": "SH", "Value": ["R1"]}},
                  {"00401001": {"vr": "SH", "Value": ["R2"]}}]}}
    _index_at_v5(tmp_path / "index.sqlite", cached)
    index = Index(tmp_path / "index.sqlite")
    try:
        returned = ["SOPInstanceUID", "TimezoneOffsetFromUTC", "BitsAllocated",
                    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                    "RequestAttributesSequence"]
        first, second = index.search(Level.INSTANCE, [], returned, False, 10, 0)
    finally:
        index.close()
    assert first == {"SOPInstanceUID": "1.2.3.1", "TimezoneOffsetFromUTC": "-0500",
                     "BitsAllocated": 8, "PerformedProcedureStepStartDate": "20250101",
                     "PerformedProcedureStepStartTime": "0800",
                     "RequestAttributesSequence": [["S1", "R1"], ["", "R2"]]}
    assert second == {"SOPInstanceUID": "1.2.3.2", **dict.fromkeys(returned[1:])}


def _index_at_v5(path: Path, cached: dict) -> None:
    """An index of schema v5 holding one study, one series and instances 1.2.3.1 and
    1.2.3.2, the first with ``cached`` as its cached DICOM JSON."""
    db = index_at_version(path, 5)
    db.execute("INSERT INTO patients (pk, patient_id, issuer_of_patient_id, other_patient_ids,"
               " patient_name, patient_birth_date, patient_sex) VALUES (1, 'P', '', '', '',"
               " '', '')")
    db.execute("INSERT INTO studies (pk, study_uid, patient_pk, study_date, study_time,"
               " accession_number, accession_issuer, study_id, study_description,"
               " referring_physician, requested_procedure_ids, placer_order_numbers,"
               " first_received_at, last_received_at) VALUES (1, '1.2', 1, '', '', '', '',"
               " '', '', '', '', '', 0, 0)")
    db.execute("INSERT INTO series (pk, series_uid, study_pk, modality, series_number,"
               " series_description, body_part, series_date, series_time)"
               " VALUES (1, '1.2.3', 1, 'CT', 1, '', '', '', '')")
    for pk in (1, 2):
        db.execute("INSERT INTO instances (pk, sop_uid, series_pk, sop_class_uid,"
                   " instance_number, transfer_syntax, rows, columns, frames, path, size,"
                   " source, received_at) VALUES (?, ?, 1, '1.2.840.10008.5.1.4.1.1.2', ?,"
                   " '1.2.840.10008.1.2.1', 4, 4, 1, 'x', 1, 'T', 0)", (pk, f"1.2.3.{pk}", pk))
    db.execute("INSERT INTO instance_metadata VALUES (1, ?)", (json.dumps(cached),))
    db.execute("PRAGMA user_version = 5")
    db.commit()
    db.close()


def _request_item(sps: str, rp: str) -> dict:
    return {"00400009": {"vr": "SH", "Value": [sps]}, "00401001": {"vr": "SH", "Value": [rp]}}


def test_request_items_an_earlier_index_kept_unbounded_are_bounded_on_migration(
        tmp_path: Path) -> None:
    """v6 copied every item of the cached metadata; v11 keeps the distinct ones, at most
    MAX_REQUEST_ITEMS, as ingest does."""
    items = [_request_item(f"S{n}", f"R{n}") for n in range(MAX_REQUEST_ITEMS + 50)]
    _index_at_v5(tmp_path / "index.sqlite", {"00400275": {"vr": "SQ", "Value": items * 2}})
    index = Index(tmp_path / "index.sqlite")
    try:
        [first, _] = index.search(Level.INSTANCE, [], ["RequestAttributesSequence"], False,
                                  10, 0)
        [series] = index.search(Level.SERIES, [], ["RequestAttributesSequence"], False, 10, 0)
    finally:
        index.close()
    expected = [[f"S{n}", f"R{n}"] for n in range(MAX_REQUEST_ITEMS)]
    assert first["RequestAttributesSequence"] == expected
    assert series["RequestAttributesSequence"] == expected


def test_a_series_of_thousands_of_request_items_answers_a_bounded_summary(
        tmp_path: Path, database_url: str) -> None:
    """Two instances of 5 000 distinct Request Attributes items each (the structure limits
    allow far more): the series and each instance answer the first MAX_REQUEST_ITEMS
    distinct items received, and the index serves other queries (the merge is linear and
    bounded, where it was quadratic under the index lock)."""
    with InProcessService(tmp_path / "data", database_url=database_url) as web:
        study, series = generate_uid(), generate_uid()
        for k in (1, 2):
            result = web.ingest(ct_slice(
                study, series, 1, k, size=4, patient_id="PX",
                RequestAttributesSequence=[_requested(f"S{k}-{n}", f"R{k}-{n}")
                                           for n in range(5000)] * 2))
            assert result.accepted, result.message
        other = generate_uid()
        web.ingest(ct_slice(other, generate_uid(), 1, 1, size=4, patient_id="PY"))
        [found] = _results(web, "/series", PatientID="PX")
        items = found["00400275"]["Value"]
        assert len(items) == MAX_REQUEST_ITEMS
        assert [(i["00400009"]["Value"][0], i["00401001"]["Value"][0]) for i in items] == \
            [(f"S1-{n}", f"R1-{n}") for n in range(MAX_REQUEST_ITEMS)]
        for instance in _results(web, "/instances", PatientID="PX"):
            assert len(instance["00400275"]["Value"]) == MAX_REQUEST_ITEMS
        assert len(_results(web, f"/studies/{other}/series")) == 1


def _work(web: InProcessService, path: str, params: dict, headers: dict) -> int:
    """The work the index does to answer ``path``, a deterministic measure, not a time:
    SQLite virtual machine steps (in thousands), PostgreSQL buffers hit or read (each
    statement the request ran, run again under EXPLAIN ANALYZE)."""
    engine = web.store.index.database.engine
    steps = 0
    statements: list[tuple[str, object]] = []
    connections = []

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    def checkout(dbapi_connection: object, *_: object) -> None:
        connections.append(dbapi_connection)
        dbapi_connection.set_progress_handler(step, 1000)  # type: ignore[attr-defined]

    def executed(_conn: object, _cursor: object, statement: str, parameters: object,
                 *_: object) -> None:
        statements.append((statement, parameters))

    sqlite = engine.dialect.name == "sqlite"
    listener = ("checkout", checkout) if sqlite else ("before_cursor_execute", executed)
    event.listen(engine, *listener)
    try:
        response = web.get(f"/dicom-web{path}", params=params, headers=headers)
        assert response.status_code == 200, response.text
    finally:
        event.remove(engine, *listener)
        for connection in connections:
            connection.set_progress_handler(None, 0)
    if sqlite:
        return steps
    with engine.connect() as connection:
        cursor = connection.connection.cursor()
        for statement, parameters in statements:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters)
            [[[plan]]] = cursor.fetchall()
            steps += plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"]
    return steps


def test_series_values_are_computed_once_per_series_not_once_per_row(
        crowded: InProcessService) -> None:
    """The instances of one series of 1 002 carry its Number of Series Related Instances
    and the study's counts; under a manifest's scope too. A page of 200 costs far less than
    200 pages of 1 (the series values were computed for each row: 1 000 rows x 1 002
    instances under a manifest took seconds)."""
    [study] = _results_of(crowded, "/studies")
    study_uid = study["0020000D"]["Value"][0]
    scoped = {**JSON, "KOS-SOPInstanceUID": publish(crowded, study_uid)}
    for headers in (JSON, scoped):
        path = f"/studies/{study_uid}/instances"
        one = _work(crowded, path, {"limit": 1}, headers)
        page = _work(crowded, path, {"limit": 200}, headers)
        assert page < 20 * max(one, 1), (headers, one, page)
        [first] = crowded.get(f"/dicom-web{path}", params={"limit": 1},
                              headers=headers).json()
        assert first["00201209"]["Value"] == [1002]


def _results_of(service: InProcessService, path: str) -> list[dict]:
    response = service.get(f"/dicom-web{path}", headers=JSON)
    assert response.status_code == 200, response.text
    return response.json()


def test_an_sqlite_older_than_the_index_needs_is_refused_clearly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index runs UPDATE ... FROM, RETURNING and DROP COLUMN (SQLite 3.35): an older
    library is refused when the index opens, naming both versions, as a ValueError
    (`passerelle serve` reports it as "cannot serve: ...")."""
    monkeypatch.setattr(storage.index.sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(storage.index.sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(UnsupportedSQLiteError, match=r"SQLite 3\.34\.1 is older than 3\.35\.0"):
        Index(tmp_path / "index.sqlite")
    assert issubclass(UnsupportedSQLiteError, ValueError)
    assert not (tmp_path / "index.sqlite").exists()


def test_the_requests_of_an_instance_are_made_distinct_in_linear_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the header of an instance of 2 000 distinct Request Attributes items (each
    twice) compares requests about as many times as there are items, not once per pair of
    items (4 000 items took minutes; the structure limits allow 50 000)."""
    comparisons = 0
    compare = Request.__eq__

    def counted(self: Request, other: object) -> bool:
        nonlocal comparisons
        comparisons += 1
        return compare(self, other)

    monkeypatch.setattr(Request, "__eq__", counted)
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4,
                  RequestAttributesSequence=[_requested(f"S{n}", f"R{n}")
                                             for n in range(2000)] * 2)
    record = read_header(part10(ds))
    assert len(json.loads(record.requests)) == 2000
    assert len(json.loads(record.requested_procedure_ids)) == 2000
    assert comparisons <= 2 * 2000, comparisons
