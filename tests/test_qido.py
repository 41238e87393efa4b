"""QIDO-RS (PS3.18 10.6): matching, paging and validation in-process (raw HTTP on the
application), and dicomweb-client against a running service over a socket; each on an
SQLite and on a PostgreSQL index."""

import json
import logging
from collections.abc import Callable, Iterator

import psycopg
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import make_url

from gateway.web.http.responses import json_bytes
from storage.search import Level, Match
from tests.inprocess import InProcessService
from tests.processes import PasserelleProcess
from tests.scu import send
from tests.synthetic import ct_slice, part10
from tests.test_stow_rs import multipart, post

STUDIES = [
    # patient id, name, date, time, accession, modality per series
    ("P1", "DUPONT^JEAN", "20260110", "101500", "ACC1", ["CT", "CT"]),
    ("P2", "MÜLLER^HÉLÈNE", "20260112", "083000", "ACC2", ["MR"]),
    ("P3", "Martin^Paul", "20251231", "235959", "ACC3", ["CT", "SR"]),
    ("P1", "DUPONT^JEAN", "20260201", "120000", "ACC4", ["MR", "PT"]),
]


def _datasets() -> Iterator[Dataset]:
    """The instances of STUDIES, two per series."""
    for patient, name, date, time, accession, modalities in STUDIES:
        study = generate_uid()
        for number, modality in enumerate(modalities, start=1):
            series = generate_uid()
            for instance in (1, 2):
                yield ct_slice(study, series, number, instance, size=4, patient_id=patient,
                               accession=accession, PatientName=name, StudyDate=date,
                               StudyTime=time, Modality=modality,
                               SpecificCharacterSet="ISO_IR 192")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory,
            module_new_database_url: Callable[[], str]) -> Iterator[InProcessService]:
    """The application in-process, holding the studies of STUDIES."""
    with InProcessService(tmp_path_factory.mktemp("qido") / "data",
                          database_url=module_new_database_url()) as service:
        service.ingest_all(_datasets())
        yield service


@pytest.fixture(scope="module")
def qido(tmp_path_factory: pytest.TempPathFactory,
         module_new_database_url: Callable[[], str]) -> Iterator[DICOMwebClient]:
    """A dicomweb-client session on a running service that received STUDIES over DICOM."""
    with PasserelleProcess(tmp_path_factory.mktemp("qido-e2e") / "data",
                           database_url=module_new_database_url()) as server:
        for ds in _datasets():
            assert send(server.dicom_port, ds)[0] == 0x0000
        yield DICOMwebClient(url=f"{server.base_url}/dicom-web")


def search(service: InProcessService, path: str = "/studies", **params: object) -> list[dict]:
    """A QIDO-RS search as dicomweb-client sends it (``Accept: application/dicom+json``)."""
    response = service.get(f"/dicom-web{path}", params=params,
                           headers={"Accept": "application/dicom+json, application/json"})
    assert response.status_code == 200, response.text
    return response.json()


def values(results: list[dict], tag: str) -> list:
    return [r[tag]["Value"][0] if "Value" in r[tag] else None for r in results]


def test_all_studies_with_computed_attributes(indexed: InProcessService) -> None:
    results = search(indexed)
    assert len(results) == 4
    by_accession = {r["00080050"]["Value"][0]: r for r in results}
    first = by_accession["ACC1"]
    assert first["00201206"]["Value"] == [2]  # NumberOfStudyRelatedSeries
    assert first["00201208"]["Value"] == [4]  # NumberOfStudyRelatedInstances
    assert first["00080061"]["Value"] == ["CT"]  # ModalitiesInStudy
    assert by_accession["ACC4"]["00080061"]["Value"] == ["MR", "PT"]
    assert first["00100010"]["Value"] == [{"Alphabetic": "DUPONT^JEAN"}]
    study_uid = first["0020000D"]["Value"][0]
    assert first["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{study_uid}")
    # Most recent first.
    assert values(results, "00080020") == ["20260201", "20260112", "20260110", "20251231"]


@pytest.mark.parametrize("filters, accessions", [
    ({"PatientID": "P1"}, {"ACC1", "ACC4"}),
    ({"00100020": "P1"}, {"ACC1", "ACC4"}),
    ({"PatientID": "P*"}, {"ACC1", "ACC2", "ACC3", "ACC4"}),
    ({"PatientID": "P?"}, {"ACC1", "ACC2", "ACC3", "ACC4"}),
    ({"PatientID": "p1"}, set()),
    ({"AccessionNumber": "ACC3"}, {"ACC3"}),
    ({"StudyDate": "20260101-20260131"}, {"ACC1", "ACC2"}),
    ({"StudyDate": "20260112-"}, {"ACC2", "ACC4"}),
    ({"StudyDate": "-20251231"}, {"ACC3"}),
    ({"StudyDate": "20260110", "StudyTime": "1000-1100"}, {"ACC1"}),
    ({"ModalitiesInStudy": "MR"}, {"ACC2", "ACC4"}),
    ({"ModalitiesInStudy": "SR,PT"}, {"ACC3", "ACC4"}),
    ({"PatientName": "DUPONT^JEAN"}, {"ACC1", "ACC4"}),
    ({"PatientName": "dupont*"}, set()),
    ({"PatientName": "DUP*"}, {"ACC1", "ACC4"}),
    ({"PatientName": "Martin^Paul"}, {"ACC3"}),
])
def test_study_matching(indexed: InProcessService, filters: dict, accessions: set) -> None:
    results = search(indexed, **filters)
    assert set(values(results, "00080050")) == accessions


@pytest.mark.parametrize("name, accessions", [
    ("dupont", {"ACC1", "ACC4"}),
    ("jean", {"ACC1", "ACC4"}),
    ("muller", {"ACC2"}),
    ("helene", {"ACC2"}),
    ("MÜLLER", {"ACC2"}),
    ("mart", {"ACC3"}),
    ("m*ler", {"ACC2"}),
    ("xavier", set()),
])
def test_fuzzy_person_names(indexed: InProcessService, name: str, accessions: set) -> None:
    results = search(indexed, PatientName=name, fuzzymatching="true")
    assert set(values(results, "00080050")) == accessions


# Person names with component groups (PS3.5 6.2.1, the Japanese example of PS3.5 H.3).
NAMES = {"JP": "Yamada^Tarou=山田^太郎=やまだ^たろう", "LATIN": "Yamada^Tarou",
         "OTHER": "Suzuki^Hanako=鈴木^花子=すずき^はなこ"}


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory,
          module_new_database_url: Callable[[], str]) -> Iterator[InProcessService]:
    """One study per name of NAMES (accession = its key), received by STOW-RS, the name also
    as Referring Physician's Name."""
    with InProcessService(tmp_path_factory.mktemp("qido-pn") / "data",
                          database_url=module_new_database_url()) as service:
        parts = [ct_slice(generate_uid(), generate_uid(), 1, 1, size=4, patient_id=key,
                          accession=key, PatientName=name, ReferringPhysicianName=name,
                          SpecificCharacterSet="ISO_IR 192")
                 for key, name in NAMES.items()]
        response = post(service, "/studies", multipart([part10(ds) for ds in parts]))
        assert response.status_code == 200, response.text
        yield service


@pytest.mark.parametrize("name, accessions", [
    ("Yamada^Tarou", {"JP", "LATIN"}),  # alphabetic key: also the name with other groups
    ("Yamada^Tarou^^", {"JP", "LATIN"}),  # trailing empty components are no difference
    ("=山田^太郎", {"JP"}),  # a key on the ideographic group
    ("山田^太郎", {"JP"}),  # one group, found in whichever group of the name holds it
    ("==やまだ^たろう", {"JP"}),  # a key on the phonetic group
    ("Yamada^Tarou=山田^太郎", {"JP"}),
    ("Yamada^Tarou=鈴木^花子", set()),  # every group of the key must match
    ("=山田*", {"JP"}),
    ("*^Tarou", {"JP", "LATIN"}),
    ("*^花子", {"OTHER"}),
    ("yamada^tarou", set()),  # exact matching is case-sensitive
])
@pytest.mark.parametrize("keyword", ["PatientName", "ReferringPhysicianName"])
def test_person_names_match_on_their_component_groups(named: InProcessService, keyword: str,
                                                      name: str, accessions: set) -> None:
    results = search(named, **{keyword: name})
    assert set(values(results, "00080050")) == accessions


def test_person_name_groups_are_returned_and_fuzzy_matching_still_works(
        named: InProcessService) -> None:
    [jp] = search(named, AccessionNumber="JP")
    assert jp["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                                        "Phonetic": "やまだ^たろう"}]
    for name, accessions in (("yamada", {"JP", "LATIN"}), ("山田", {"JP"}),
                             ("たろう", {"JP"}), ("suzu", {"OTHER"})):
        results = search(named, PatientName=name, fuzzymatching="true")
        assert set(values(results, "00080050")) == accessions, name


def test_study_uid_list(indexed: InProcessService) -> None:
    all_studies = search(indexed)
    uids = values(all_studies, "0020000D")[:2]
    results = search(indexed, StudyInstanceUID=",".join(uids))
    assert set(values(results, "0020000D")) == set(uids)


def test_series_and_instances(qido: DICOMwebClient) -> None:
    """End to end: dicomweb-client over a socket, on instances received over DICOM."""
    [study] = qido.search_for_studies(search_filters={"AccessionNumber": "ACC4"})
    study_uid = study["0020000D"]["Value"][0]
    series = qido.search_for_series(study_uid)
    assert values(series, "00080060") == ["MR", "PT"]
    assert values(series, "00201209") == [2, 2]  # NumberOfSeriesRelatedInstances
    assert all(r["0020000D"]["Value"] == [study_uid] for r in series)
    mr = qido.search_for_series(study_uid, search_filters={"Modality": "MR"})
    assert len(mr) == 1
    series_uid = mr[0]["0020000E"]["Value"][0]
    instances = qido.search_for_instances(study_uid, series_uid)
    assert values(instances, "00200013") == [1, 2]
    assert values(instances, "00280010") == [4, 4]
    url = instances[0]["00081190"]["Value"][0]
    assert url.endswith(f"/studies/{study_uid}/series/{series_uid}/instances/"
                        f"{instances[0]['00080018']['Value'][0]}")
    # All series of all studies, with study attributes for context.
    every_series = qido.search_for_series(search_filters={"Modality": "CT"})
    assert len(every_series) == 3
    assert "00100020" in every_series[0]
    assert len(qido.search_for_instances(search_filters={"PatientID": "P2"})) == 2


def test_return_sets_and_paging_through_dicomweb_client(
        qido: DICOMwebClient, caplog: pytest.LogCaptureFixture) -> None:
    """What tests/test_qido_return_sets.py checks in-process, as a client reads it over a
    socket: the conditional attributes (PS3.18 Table 10.6.3-5) and the paging Warning."""
    instances = qido.search_for_instances(search_filters={"PatientID": "P2"})
    assert values(instances, "00080056") == ["ONLINE", "ONLINE"]  # Instance Availability
    assert values(instances, "00280100") == [16, 16]  # Bits Allocated
    with caplog.at_level(logging.WARNING, logger="dicomweb_client"):
        page = qido.search_for_instances(search_filters={"PatientID": "P1"}, limit=3)
    assert len(page) == 3  # P1: 4 series of 2 instances
    assert "There are 5 additional results that can be requested" in caplog.text
    everything = qido.search_for_instances(search_filters={"PatientID": "P1"}, limit=3,
                                           get_remaining=True)
    assert len({r["00080018"]["Value"][0] for r in everything}) == 8


def test_limit_offset_and_includefield(indexed: InProcessService) -> None:
    page1 = search(indexed, limit=2)
    page2 = search(indexed, limit=2, offset=2)
    assert len(page1) == len(page2) == 2
    assert not set(values(page1, "0020000D")) & set(values(page2, "0020000D"))
    [series] = search(indexed, "/series", AccessionNumber="ACC2",
                      includefield=["SeriesDate", "00180015"])
    assert "00080021" in series and "00180015" in series
    everything = search(indexed, "/instances", PatientID="P3", includefield=["all"])
    assert "00280011" in everything[0] and "00100030" in everything[0]


def test_no_match_is_an_empty_array(indexed: InProcessService) -> None:
    response = indexed.get("/dicom-web/studies?PatientID=NOBODY")
    assert response.status_code == 200
    assert response.json() == []
    assert response.headers["content-type"] == "application/dicom+json"


@pytest.mark.parametrize("query, message", [
    ("NotAKeyword=1", "unknown attribute"),
    ("limit=-1", "limit must be"),
    ("limit=abc", "limit must be"),
    ("offset=x", "offset must be"),
    ("fuzzymatching=maybe", "fuzzymatching must be"),
    ("NumberOfStudyRelatedSeries=3", "is returned, not matched"),
    ("SOPInstanceUID=1.2", "cannot be matched at the study level"),
    ("StudyDate=-", "has no bound"),
    ("PatientID=a&PatientID=b", "more than once"),
    ("includefield=Bogus", "unknown attribute"),
    ("PatientID=' OR 1=1 --", None),
    ("PatientName=%00%27%22;DROP TABLE patients", None),
])
def test_bad_and_hostile_queries(indexed: InProcessService, query: str,
                                 message: str | None) -> None:
    response = indexed.get(f"/dicom-web/studies?{query}")
    if message is None:  # SQL metacharacters are values like any other
        assert response.status_code == 200
        assert response.json() == []
    else:
        assert response.status_code == 400
        assert message in response.text
    assert len(indexed.get("/dicom-web/studies").json()) == 4


def test_numeric_keys_are_numbers(indexed: InProcessService) -> None:
    response = indexed.get("/dicom-web/series?SeriesNumber=abc")
    assert response.status_code == 400
    assert "SeriesNumber must be a number" in response.text
    assert len(indexed.get("/dicom-web/series?SeriesNumber=2").json()) == 3


# Values holding what SQL patterns treat specially (LIKE's % and _, GLOB's [ ]), in both cases,
# and study times of every precision: (Patient ID, Study Description, Study Time, name).
LITERAL = [
    ("P%1", "100% DOSE", "101500", "D%AZ^ANA"),
    ("P_1", "CT_HEAD", "101559.999", "D_AZ^ANA"),
    ("PX1", "CTXHEAD", "1016", "DIAZ^ANA"),
    ("P[1]", "[CT] HEAD", "0930", "D[A]Z^ANA"),
    ("P1", "CT HEAD", "1015", "DAZ^ANA"),
    ("p%1", "ct_head", "235959", "d%az^ana"),
]


def _english_database(url: str) -> str:
    """A new database beside the PostgreSQL database of ``url`` whose collation is not code
    point order: glibc's en_US.UTF-8 where the system has it (punctuation and U+FFFF weigh
    nothing there at first), else ICU's root (upper and lower case interleaved)."""
    server = make_url(url)
    name = f"{server.database}_en"
    with psycopg.connect(server.set(drivername="postgresql", database="postgres")
                         .render_as_string(hide_password=False), autocommit=True) as db:
        english = db.execute("SELECT 1 FROM pg_collation WHERE collname = 'en_US.utf8'"
                             ).fetchone()
        locale = ("LOCALE 'en_US.utf8'" if english else
                  "LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C.UTF-8'")
        db.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' {locale}")
    return server.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def literal(tmp_path_factory: pytest.TempPathFactory,
            module_new_database_url: Callable[[], str]) -> Iterator[InProcessService]:
    """The studies of LITERAL, on an SQLite index or a PostgreSQL one in a collation that is
    not code point order."""
    url = module_new_database_url()
    with InProcessService(tmp_path_factory.mktemp("qido-literal") / "data",
                          database_url=_english_database(url) if url else "") as service:
        service.ingest_all(ct_slice(generate_uid(), generate_uid(), 1, 1, size=4,
                                    patient_id=patient, accession=f"L{n}",
                                    StudyDescription=description, StudyTime=time,
                                    PatientName=name)
                           for n, (patient, description, time, name) in enumerate(LITERAL))
        yield service


@pytest.mark.parametrize("filters, patients", [
    ({"PatientID": "P%1"}, {"P%1"}),
    ({"PatientID": "P%*"}, {"P%1"}),  # % is a character like any other
    ({"PatientID": "P_*"}, {"P_1"}),  # and so is _
    ({"PatientID": "P?1"}, {"P%1", "P_1", "PX1"}),
    ({"PatientID": "P[1]"}, {"P[1]"}),
    ({"PatientID": "P[1]*"}, {"P[1]"}),  # no character class: P1 is not [1]
    ({"PatientID": "P[*"}, {"P[1]"}),
    ({"PatientID": "P\\%*"}, set()),  # a backslash is itself, not an escape of %
    ({"PatientID": "p*"}, {"p%1"}),  # case-sensitive
    ({"PatientID": "P*"}, {"P%1", "P_1", "PX1", "P[1]", "P1"}),
    ({"PatientID": "*1"}, {"P%1", "P_1", "PX1", "P1", "p%1"}),
    ({"StudyDescription": "100%*"}, {"P%1"}),
    ({"StudyDescription": "CT_*"}, {"P_1"}),
    ({"StudyDescription": "CT?HEAD"}, {"P_1", "PX1", "P1"}),
    ({"StudyDescription": "[CT]*"}, {"P[1]"}),
    ({"StudyDescription": "*HEAD"}, {"P_1", "PX1", "P[1]", "P1"}),
    ({"StudyDescription": "ct*"}, {"p%1"}),
    ({"PatientName": "D%*"}, {"P%1"}),
    ({"PatientName": "D_AZ^ANA"}, {"P_1"}),
    ({"PatientName": "D?AZ*"}, {"P%1", "P_1", "PX1"}),
    ({"PatientName": "D[A]Z^ANA"}, {"P[1]"}),
    ({"PatientName": "d%az^ana"}, {"p%1"}),
    ({"PatientName": "d%az", "fuzzymatching": "true"}, {"P%1", "p%1"}),
    ({"PatientName": "d_az", "fuzzymatching": "true"}, {"P_1"}),
    # A time bound "1015" holds every time of that minute (101559.999), however precise.
    ({"StudyTime": "-1015"}, {"P%1", "P_1", "P[1]", "P1"}),
    ({"StudyTime": "1015-1015"}, {"P%1", "P_1", "P1"}),
    ({"StudyTime": "1016-"}, {"PX1", "p%1"}),
    ({"StudyTime": "101559.9-"}, {"P_1", "PX1", "p%1"}),
    ({"StudyTime": "0930"}, {"P[1]"}),
])
def test_wildcards_case_and_time_ranges_match_alike_on_each_index(
        literal: InProcessService, filters: dict, patients: set) -> None:
    """Only * and ? are wildcards (PS3.4 C.2.2.2.4), every other character is itself,
    upper and lower case differ, times compare as the values they are (C.2.2.2.5): the same
    on SQLite (GLOB) and on PostgreSQL (LIKE, whatever the database's collation)."""
    assert set(values(search(literal, **filters), "00100020")) == patients


def test_a_search_within_thousands_of_instances(literal: InProcessService) -> None:
    """A manifest's scope of thousands of SOP Instance UIDs (one bound parameter, a JSON
    list), most of them unknown here: rows, counts and Modalities in Study are those of the
    instances within, on both dialects."""
    index = literal.store.index
    everything = index.search(Level.INSTANCE, [], ["SOPInstanceUID", "PatientID"], False,
                              100, 0)
    known = {str(row["SOPInstanceUID"]) for row in everything if row["PatientID"] in
             ("P%1", "P1")}
    within = frozenset({*known, *(generate_uid() for _ in range(5000))})
    found = index.search(Level.INSTANCE, [], ["SOPInstanceUID"], False, 100, 0, within)
    assert {row["SOPInstanceUID"] for row in found} == known
    assert index.count(Level.INSTANCE, [], False, within) == 2
    studies = index.search(Level.STUDY, [Match("ModalitiesInStudy", "CT")],
                           ["PatientID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"],
                           False, 100, 0, within)
    assert sorted((r["PatientID"], r["ModalitiesInStudy"], r["NumberOfStudyRelatedInstances"])
                  for r in studies) == [("P%1", "CT", 1), ("P1", "CT", 1)]
    assert index.count(Level.STUDY, [Match("PatientID", "P*")], False, within) == 2
    assert index.search(Level.STUDY, [], ["PatientID"], False, 100, 0, frozenset()) == []


def test_dicom_json_is_encoded_as_json_would_even_past_64_bit_integers() -> None:
    """The fast encoder (orjson) writes what json writes, compact and in UTF-8; an IS value
    past 64 bits, which it refuses, is written by json instead of failing the answer."""
    payload = [{"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Hélène=山田^太郎"}]},
                "00200013": {"vr": "IS", "Value": [12]}, "00081030": {"vr": "LO"},
                "0020000D": {"vr": "UI", "Value": ["1.2.3\n"]}}]
    assert json_bytes(payload) == json.dumps(payload, ensure_ascii=False,
                                             separators=(",", ":")).encode()
    huge = [{"00200013": {"vr": "IS", "Value": [1 << 70]}}]
    assert json.loads(json_bytes(huge)) == huge
