"""One truth per patient, study and series (issue 15, findings 1-3): through C-STORE to a
running service (pynetdicom) and STOW-RS to the application in-process (httpx).

- each study shows its own patient module, not the first study's of its Patient ID;
- a series known in another study, a study known under another Patient ID or issuer, a SOP
  Instance UID stored with another data set or elsewhere: refused, under both duplicate
  policies, with a failure status; the stored objects stay as they were;
- an identical re-send stays a success whose RetrieveURL serves that object.

Each runs on SQLite and on PostgreSQL (the ``web``, ``make_web`` and ``scp`` services of this
module take a database of each dialect), where writers of one study race for real: the index
re-checks the rows its upserts meet.
"""

import copy
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

import storage.index
from storage.blobs import BlobStore
from storage.database import Database
from storage.header import InstanceRecord, read_header
from storage.index import IdentityConflictError, Index
from storage.sameness import FixedBudget
from storage.store import Outcome, Rejection, Store
from storage.study_contents import load_study_contents
from tests.inprocess import InProcessService
from tests.multipart import parts_of
from tests.old_index import index_at_version
from tests.processes import PasserelleProcess
from tests.scu import associate
from tests.synthetic import ct_slice, part10
from tests.test_stow_rs import multipart, post

STUDY_OF_OTHER_PATIENT, SERIES_OF_OTHER_STUDY, DUPLICATE_SOP_INSTANCE = 0xC510, 0xC511, 0x0111


def c_store(server: PasserelleProcess, ds: Dataset) -> Dataset:
    """The C-STORE response status of ``ds`` sent over a fresh association."""
    assoc = associate(server.dicom_port, [ds])
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def qido(base_url: str, path: str = "/studies", **params: str) -> list[dict]:
    response = httpx.get(f"{base_url}/dicom-web{path}", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def first(result: dict, tag: str) -> object:
    return result[tag]["Value"][0] if "Value" in result[tag] else None


def retrieved(web: InProcessService, url: str) -> Dataset:
    """The one instance a WADO-RS URL serves."""
    response = web.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 200, response.text
    [(_, data)] = parts_of(response)
    return dcmread(BytesIO(data))


def stored_sop_uids(data_dir: Path) -> set[str]:
    return {path.stem for path in (data_dir / "studies").rglob("*.dcm")}


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory, module_database_url: str
        ) -> Iterator[PasserelleProcess]:
    """A running service with the default duplicate policy (keep-first)."""
    with PasserelleProcess(tmp_path_factory.mktemp("integrity") / "data",
                           database_url=module_database_url) as process:
        yield process


@pytest.fixture
def web(tmp_path: Path, database_url: str) -> Iterator[InProcessService]:
    """The application in-process on a fresh data dir and a fresh database of each dialect."""
    with InProcessService(tmp_path / "data", database_url=database_url) as service:
        yield service


@pytest.fixture
def make_web(tmp_path: Path, new_database_url: Callable[[], str]
             ) -> Iterator[Callable[..., InProcessService]]:
    """``make_web(name, **settings)`` (conftest's), each service on a database of its own."""
    made: list[InProcessService] = []

    def make(name: str = "data", **settings: object) -> InProcessService:
        made.append(InProcessService(tmp_path / name, database_url=new_database_url(),
                                     **settings))
        return made[-1]

    yield make
    for service in reversed(made):
        service.close()


# --- 1. the patient module of a study is its own ------------------------------------------

def test_a_second_study_of_a_patient_id_shows_its_own_patient_module(
        scp: PasserelleProcess) -> None:
    patient = f"PID-{generate_uid()[-8:]}"
    first_study, second_study = generate_uid(), generate_uid()
    assert c_store(scp, ct_slice(first_study, generate_uid(), 1, 1, size=4, patient_id=patient,
                                 PatientName="DUPONT^JEAN")).Status == 0x0000
    assert c_store(scp, ct_slice(second_study, generate_uid(), 1, 1, size=4,
                                 patient_id=patient, PatientName="DUPONT^JEANNE",
                                 PatientBirthDate="19710202", PatientSex="F")).Status == 0x0000
    [second] = qido(scp.base_url, StudyInstanceUID=second_study)
    assert first(second, "00100010") == {"Alphabetic": "DUPONT^JEANNE"}
    assert (first(second, "00100030"), first(second, "00100040")) == ("19710202", "F")
    [one] = qido(scp.base_url, StudyInstanceUID=first_study)
    assert first(one, "00100010") == {"Alphabetic": "DUPONT^JEAN"}
    assert (first(one, "00100030"), first(one, "00100040")) == ("19700101", "M")
    # Matching on demographics finds each study by its own.
    found = qido(scp.base_url, PatientID=patient, PatientName="DUPONT^JEANNE")
    assert [first(r, "0020000D") for r in found] == [second_study]
    series = qido(scp.base_url, f"/studies/{second_study}/series", includefield="00100010")
    assert first(series[0], "00100010") == {"Alphabetic": "DUPONT^JEANNE"}


def test_the_manifest_contents_carry_the_studys_own_patient_module(web: InProcessService
                                                                   ) -> None:
    patient, studies = "PID-KOS", [generate_uid(), generate_uid()]
    for study, name in zip(studies, ("MARTIN^ANNE", "MARTIN^ANNIE"), strict=True):
        ds = ct_slice(study, generate_uid(), 1, 1, size=4, patient_id=patient,
                      PatientName=name)
        assert post(web, "/studies", multipart([part10(ds)])).status_code == 200
    contents = [load_study_contents(web.store.index, study) for study in studies]
    assert [c.patient_name for c in contents if c] == ["MARTIN^ANNE", "MARTIN^ANNIE"]


def test_instances_of_one_study_that_disagree_keep_its_first_patient_module(
        scp: PasserelleProcess) -> None:
    """Same Patient ID and issuer, other demographics: stored as received (the same patient
    by identifier), the study keeps the patient module of its first instance, a warning is
    logged."""
    study, series, log = generate_uid(), generate_uid(), len(scp.log())
    one = ct_slice(study, series, 1, 1, size=4, patient_id="PID-MIX", PatientName="ROUX^LEA")
    other = ct_slice(study, series, 1, 2, size=4, patient_id="PID-MIX",
                     PatientName="ROUX^LEO", PatientSex="F")
    assert c_store(scp, one).Status == 0x0000
    assert c_store(scp, other).Status == 0x0000
    [result] = qido(scp.base_url, StudyInstanceUID=study)
    assert first(result, "00100010") == {"Alphabetic": "ROUX^LEA"}
    assert first(result, "00100040") == "M"
    assert first(result, "00201208") == 2
    assert "keeps the patient module of its first instance" in scp.log()[log:]
    assert "PatientName, PatientSex" in scp.log()[log:]
    # The second object is served as it was received.
    response = httpx.get(f"{scp.base_url}/dicom-web/studies/{study}/series/{series}/"
                         f"instances/{other.SOPInstanceUID}/metadata", timeout=30)
    assert response.json()[0]["00100010"]["Value"] == [{"Alphabetic": "ROUX^LEO"}]


def test_an_index_of_v5_gets_each_studys_own_patient_module(tmp_path: Path) -> None:
    """An index written by a version that kept one patient module per Patient ID: migrated,
    each study reads its own again from its first instance's file."""
    data = tmp_path / "data"
    blobs = BlobStore(data)
    db = index_at_version(data / "index.sqlite", 5)
    db.execute("INSERT INTO patients VALUES (1, 'P5', 'HOSP', '', 'BLANC^PAUL', '19500505',"
               " 'M', '^blanc^paul')")
    studies = []
    for pk, name in ((1, "BLANC^PAUL"), (2, "BLANC^PAULINE")):
        ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4, patient_id="P5",
                      PatientName=name, PatientBirthDate="19500505")
        relative = blobs.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                       ds.SOPInstanceUID)
        raw = part10(ds)
        blobs.put(relative, [raw])
        db.execute("INSERT INTO studies (pk, study_uid, patient_pk, study_date, study_time,"
                   " accession_number, accession_issuer, study_id, study_description,"
                   " referring_physician, requested_procedure_ids, placer_order_numbers,"
                   " first_received_at, last_received_at) VALUES"
                   " (?, ?, 1, '', '', '', '', '', '', '', '', '', 0, 0)",
                   (pk, ds.StudyInstanceUID))
        db.execute("INSERT INTO series (pk, series_uid, study_pk, modality, series_description,"
                   " body_part, series_date, series_time) VALUES (?, ?, ?, 'CT', '', '', '',"
                   " '')", (pk, ds.SeriesInstanceUID, pk))
        db.execute("INSERT INTO instances (sop_uid, series_pk, sop_class_uid, transfer_syntax,"
                   " path, size, source, received_at) VALUES (?, ?, ?, ?, ?, ?, 'old', 0)",
                   (ds.SOPInstanceUID, pk, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID,
                    relative, len(raw)))
        studies.append(ds.StudyInstanceUID)
    db.execute("PRAGMA user_version = 5")
    db.commit()
    db.close()
    with InProcessService(data) as service:
        names = [first(search, "00100010") for study in studies
                 for search in service.get("/dicom-web/studies",
                                           params={"StudyInstanceUID": study}).json()]
        assert names == [{"Alphabetic": "BLANC^PAUL"}, {"Alphabetic": "BLANC^PAULINE"}]
        assert service.store.index.patient_modules_to_read() == []
        fuzzy = service.get("/dicom-web/studies", params={"PatientName": "pauline",
                                                          "fuzzymatching": "true"}).json()
        assert [first(r, "0020000D") for r in fuzzy] == [studies[1]]


# --- 2. a series or a study never changes parent -------------------------------------------

def test_a_series_known_in_another_study_is_refused_over_dicom(scp: PasserelleProcess) -> None:
    study_a, study_b, series = generate_uid(), generate_uid(), generate_uid()
    assert c_store(scp, ct_slice(study_a, series, 1, 1, size=4)).Status == 0x0000
    failures = scp.metric("passerelle_ingest_failures_total", protocol="dimse",
                          reason="series-of-other-study")
    intruder = ct_slice(study_b, series, 1, 2, size=4)
    status = c_store(scp, intruder)
    assert status.Status == SERIES_OF_OTHER_STUDY
    assert status.OffendingElement == 0x0020000E
    assert status.ErrorComment.startswith("Series Instance UID already in another study")
    assert intruder.SOPInstanceUID not in stored_sop_uids(scp.data_dir)
    assert qido(scp.base_url, StudyInstanceUID=study_b) == []
    [only] = qido(scp.base_url, f"/studies/{study_a}/series")
    assert first(only, "00201209") == 1
    assert scp.metric("passerelle_ingest_failures_total", protocol="dimse",
                      reason="series-of-other-study") == failures + 1


def test_a_series_known_in_another_study_is_refused_over_stow(web: InProcessService) -> None:
    study_a, study_b, series = generate_uid(), generate_uid(), generate_uid()
    assert post(web, f"/studies/{study_a}", multipart([part10(
        ct_slice(study_a, series, 1, 1, size=4))])).status_code == 200
    intruder = ct_slice(study_b, series, 1, 2, size=4)
    response = post(web, f"/studies/{study_b}", multipart([part10(intruder)]))
    assert response.status_code == 409
    body = response.json()
    [failed] = body["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [SERIES_OF_OTHER_STUDY]
    assert failed["00081155"]["Value"] == [intruder.SOPInstanceUID]
    assert "00081190" not in failed
    assert body["00081190"] == {"vr": "UR"}
    assert web.get(f"/dicom-web/studies/{study_b}/series").json() == []
    assert intruder.SOPInstanceUID not in stored_sop_uids(web.data_dir)


@pytest.mark.parametrize("changes", [{"PatientID": "OTHER-PID"},
                                     {"IssuerOfPatientID": "OTHER-HOSP"}])
def test_a_study_received_with_another_patient_is_refused_over_dicom(
        scp: PasserelleProcess, changes: dict[str, str]) -> None:
    study = generate_uid()
    assert c_store(scp, ct_slice(study, generate_uid(), 1, 1, size=4,
                                 patient_id="PID-OWNER")).Status == 0x0000
    intruder = ct_slice(study, generate_uid(), 2, 1, size=4, patient_id="PID-OWNER",
                        **changes)
    status = c_store(scp, intruder)
    assert status.Status == STUDY_OF_OTHER_PATIENT
    assert status.OffendingElement == 0x00100020
    assert status.ErrorComment.startswith("Study Instance UID already of another patient")
    assert "PID-OWNER" not in status.ErrorComment  # the other patient is not disclosed
    [result] = qido(scp.base_url, StudyInstanceUID=study)
    assert (first(result, "00100020"), first(result, "00201208")) == ("PID-OWNER", 1)
    assert intruder.SOPInstanceUID not in stored_sop_uids(scp.data_dir)


def test_a_study_received_with_another_patient_is_refused_over_stow(web: InProcessService
                                                                    ) -> None:
    study = generate_uid()
    owner = ct_slice(study, generate_uid(), 1, 1, size=4, patient_id="PID-A")
    intruder = ct_slice(study, generate_uid(), 2, 1, size=4, patient_id="PID-B")
    failures = web.metric("passerelle_ingest_failures_total", protocol="stow",
                          reason="study-of-other-patient")
    response = post(web, "/studies", multipart([part10(owner), part10(intruder)]))
    assert response.status_code == 202  # one stored, one failed (PS3.18 10.5.3)
    body = response.json()
    assert [i["00081197"]["Value"] for i in body["00081198"]["Value"]] == [
        [STUDY_OF_OTHER_PATIENT]]
    [stored] = body["00081199"]["Value"]
    assert retrieved(web, stored["00081190"]["Value"][0]).PatientID == "PID-A"
    assert web.metric("passerelle_ingest_failures_total", protocol="stow",
                      reason="study-of-other-patient") == failures + 1
    [result] = web.get("/dicom-web/studies", params={"StudyInstanceUID": study}).json()
    assert first(result, "00100020") == "PID-A"


# --- 3. a SOP Instance UID collision is never a success ------------------------------------

def test_keep_first_refuses_another_data_set_under_a_stored_uid_over_dicom(
        scp: PasserelleProcess) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4)
    assert c_store(scp, ds).Status == 0x0000
    [path] = [p for p in (scp.data_dir / "studies").rglob(f"{ds.SOPInstanceUID}.dcm")]
    assert c_store(scp, ds).Status == 0x0000  # the same again: already stored, a success
    changed = ct_slice(ds.StudyInstanceUID, ds.SeriesInstanceUID, 1, 1, size=4,
                       sop_uid=ds.SOPInstanceUID, PatientName="AUTRE^NOM")
    status = c_store(scp, changed)
    assert status.Status == DUPLICATE_SOP_INSTANCE
    assert status.OffendingElement == 0x00080018
    assert "already stored with another data set" in status.ErrorComment
    assert dcmread(path).PatientName == "DUPONT^JEAN"


def test_keep_first_refuses_another_data_set_under_a_stored_uid_over_stow(
        web: InProcessService) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4)
    assert post(web, "/studies", multipart([part10(ds)])).status_code == 200
    again = post(web, "/studies", multipart([part10(ds)]))
    assert again.status_code == 200
    url = again.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    assert retrieved(web, url).PatientName == "DUPONT^JEAN"
    changed = ct_slice(ds.StudyInstanceUID, ds.SeriesInstanceUID, 1, 1, size=4,
                       sop_uid=ds.SOPInstanceUID, PatientName="AUTRE^NOM")
    response = post(web, "/studies", multipart([part10(changed)]))
    assert response.status_code == 409
    body = response.json()
    assert "00081199" not in body  # never "stored"
    assert body["00081198"]["Value"][0]["00081197"]["Value"] == [DUPLICATE_SOP_INSTANCE]


def test_a_stored_uid_in_another_study_is_refused_under_either_policy(
        make_web: Callable[..., InProcessService]) -> None:
    for policy in ("keep-first", "overwrite"):
        web = make_web(policy, duplicate_policy=policy)
        victim = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4, patient_id="VICTIM",
                          PatientName="VICTIME^VERA")
        stored = post(web, "/studies", multipart([part10(victim)])).json()
        url = stored["00081199"]["Value"][0]["00081190"]["Value"][0]
        other = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4, patient_id="OTHER",
                         PatientName="AUTRE^OTTO", sop_uid=victim.SOPInstanceUID)
        response = post(web, "/studies", multipart([part10(other)]))
        assert response.status_code == 409, policy
        assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [
            DUPLICATE_SOP_INSTANCE]
        served = retrieved(web, url)
        assert (served.PatientID, served.PatientName) == ("VICTIM", "VICTIME^VERA"), policy
        assert web.get(f"/dicom-web/studies/{other.StudyInstanceUID}/series").json() == []


def test_overwrite_replaces_within_the_same_series_only(tmp_path: Path, database_url: str
                                                        ) -> None:
    with PasserelleProcess(tmp_path / "data", duplicate_policy="overwrite",
                           database_url=database_url) as server:
        ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4)
        assert c_store(server, ds).Status == 0x0000
        moved = ct_slice(ds.StudyInstanceUID, generate_uid(), 2, 1, size=4,
                         sop_uid=ds.SOPInstanceUID)
        assert c_store(server, moved).Status == DUPLICATE_SOP_INSTANCE
        corrected = ct_slice(ds.StudyInstanceUID, ds.SeriesInstanceUID, 1, 1, size=4,
                             sop_uid=ds.SOPInstanceUID, SeriesDescription="CORRECTED",
                             PatientName="DUPONT^JEAN-MARC")
        assert c_store(server, corrected).Status == 0x0000
        [path] = (server.data_dir / "studies").rglob("*.dcm")
        assert dcmread(path).SeriesDescription == "CORRECTED"
        assert path.parent.name == ds.SeriesInstanceUID
        # The study's patient module is its first instance's, as now stored.
        [study] = qido(server.base_url, StudyInstanceUID=ds.StudyInstanceUID)
        assert first(study, "00100010") == {"Alphabetic": "DUPONT^JEAN-MARC"}
        second = ct_slice(ds.StudyInstanceUID, ds.SeriesInstanceUID, 1, 2, size=4,
                          PatientName="DUPONT^J")
        assert c_store(server, second).Status == 0x0000
        assert c_store(server, ct_slice(ds.StudyInstanceUID, ds.SeriesInstanceUID, 1, 2,
                                        size=4, sop_uid=second.SOPInstanceUID,
                                        PatientName="DUPONT^JM")).Status == 0x0000
        [study] = qido(server.base_url, StudyInstanceUID=ds.StudyInstanceUID)
        assert first(study, "00100010") == {"Alphabetic": "DUPONT^JEAN-MARC"}


def test_two_patients_sending_one_new_study_at_once_leave_one(web: InProcessService) -> None:
    """Two first instances of a new study with other Patient IDs, sent at the same time:
    one stored, the other refused, whichever commits first (the check is repeated inside
    the index transaction), and only the stored one's file remains."""
    for _ in range(20):
        study = generate_uid()
        bodies = [multipart([part10(ct_slice(study, generate_uid(), 1, 1, size=4,
                                             patient_id=patient))]) for patient in ("A", "B")]
        with ThreadPoolExecutor(2) as pool:
            statuses = sorted(pool.map(lambda body: post(web, "/studies", body).status_code,
                                       bodies))
        assert statuses == [200, 409]
        [result] = web.get("/dicom-web/studies", params={"StudyInstanceUID": study}).json()
        assert first(result, "00201208") == 1
        assert len(list((web.data_dir / "studies" / study).rglob("*.dcm"))) == 1


def test_the_same_instance_in_another_transfer_syntax_is_already_stored(
        web: InProcessService) -> None:
    """An instance may travel in any transfer syntax (PS3.5 10): re-sent re-encoded with
    the same attributes it is already stored; re-encoded and changed, a conflict."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4)
    assert post(web, "/studies", multipart([part10(ds)])).status_code == 200
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    again = post(web, "/studies", multipart([part10(ds)]))
    assert again.status_code == 200
    assert again.json()["00081199"]["Value"][0]["00081155"]["Value"] == [ds.SOPInstanceUID]
    [path] = (web.data_dir / "studies").rglob(f"{ds.SOPInstanceUID}.dcm")
    assert dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # the first
    ds.PatientName = "AUTRE^NOM"
    changed = post(web, "/studies", multipart([part10(ds)]))
    assert changed.status_code == 409
    assert changed.json()["00081198"]["Value"][0]["00081197"]["Value"] == [
        DUPLICATE_SOP_INSTANCE]


# --- re-sent in another transfer syntax: compared decoded (review 3, finding 4) -----------

def _encapsulated(ds: Dataset, syntax: str, fragment: bytes) -> Dataset:
    """``ds`` re-encoded (as a sender would claim) in ``syntax`` with one frame ``fragment``."""
    again = copy.deepcopy(ds)
    again.file_meta.TransferSyntaxUID = syntax
    again.PixelData = encapsulate([fragment])
    return again


def test_a_re_sent_instance_in_another_syntax_is_compared_decoded(scp: PasserelleProcess
                                                                  ) -> None:
    """Keep-first: the stored instance re-sent re-encoded is already stored only if it
    decodes to the same data set; other pixels, window or position in another syntax are a
    conflict (0x0111), never a success that drops them."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    assert c_store(scp, ds).Status == 0x0000
    rle = copy.deepcopy(ds)
    rle.compress(RLELossless, generate_instance_uid=False)
    assert c_store(scp, rle).Status == 0x0000  # losslessly re-compressed: the same
    for change in ({"PixelData": bytes(len(ds.PixelData))}, {"WindowCenter": 50},
                   {"ImagePositionPatient": [0, 0, 2]}):
        other = copy.deepcopy(ds)
        for keyword, value in change.items():
            setattr(other, keyword, value)
        other.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        status = c_store(scp, other)
        assert status.Status == DUPLICATE_SOP_INSTANCE, change
        assert "another data set" in status.ErrorComment, change
        other.compress(RLELossless, generate_instance_uid=False)
        assert c_store(scp, other).Status == DUPLICATE_SOP_INSTANCE, change
    [path] = (scp.data_dir / "studies").rglob(f"{ds.SOPInstanceUID}.dcm")
    assert dcmread(path).PixelData == ds.PixelData


def test_a_lossy_or_undecodable_re_encoding_is_never_already_stored(web: InProcessService
                                                                     ) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    assert post(web, "/studies", multipart([part10(ds)])).status_code == 200
    for syntax, why in ((JPEGBaseline8Bit, "another data set"),  # lossy: other pixels
                        (RLELossless, "could not be compared")):  # not RLE at all
        response = post(web, "/studies",
                        multipart([part10(_encapsulated(ds, syntax, b"\x00" * 16))]))
        assert response.status_code == 409, syntax
        failed = response.json()["00081198"]["Value"][0]
        assert failed["00081197"]["Value"] == [DUPLICATE_SOP_INSTANCE], syntax
        assert why in web.store.ingest(part10(_encapsulated(ds, syntax, b"\x00" * 16)),
                                       "test").message, syntax


def test_a_comparison_over_the_decode_budget_is_refused(tmp_path: Path, database_url: str
                                                        ) -> None:
    """Decoding is reserved before it is done: past the budget, refused (not stored, not
    called stored)."""
    store = Store(tmp_path / "data", decode_memory=FixedBudget(1000), database_url=database_url)
    try:
        ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=32)
        assert store.ingest(part10(ds), "test").outcome is Outcome.STORED
        ds.compress(RLELossless, generate_instance_uid=False)
        result = store.ingest(part10(ds), "test")
        assert (result.outcome, result.reason) == (Outcome.REJECTED,
                                                   Rejection.SOP_INSTANCE_CONFLICT)
        assert "could not be compared" in result.message
        assert "more than the" in result.message
    finally:
        store.close()


def test_a_corrected_re_send_under_overwrite_refreshes_the_study_and_series(
        make_web: Callable[..., InProcessService]) -> None:
    """Overwrite: a study re-sent corrected at the RIS (accession, date, description,
    referring physician, series description) is then shown, and published, as corrected:
    replacing the first instance of a study replaces its study module, that of a series
    its attributes and requests (review 3, finding 6)."""
    web = make_web("overwrite", duplicate_policy="overwrite")
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid(), generate_uid()]
    for number, sop in enumerate(sops, 1):
        wrong = ct_slice(study, series, 1, number, size=4, accession="", sop_uid=sop,
                         StudyDate="", PatientName="ERREUR^NOM", SeriesDescription="?")
        assert post(web, "/studies", multipart([part10(wrong)])).status_code == 200
    for number, sop in enumerate(sops, 1):
        fixed = ct_slice(study, series, 1, number, size=4, accession="ACC-FIXED", sop_uid=sop,
                         StudyDate="20260111", PatientName="BON^NOM",
                         StudyDescription="CT ABDOMEN", ReferringPhysicianName="DURAND^LUC",
                         SeriesDescription="ABDOMEN")
        assert post(web, "/studies", multipart([part10(fixed)])).status_code == 200
    [result] = web.get("/dicom-web/studies", params={"StudyInstanceUID": study}).json()
    assert (first(result, "00080050"), first(result, "00080020")) == ("ACC-FIXED", "20260111")
    assert first(result, "00081030") == "CT ABDOMEN"
    assert first(result, "00080090") == {"Alphabetic": "DURAND^LUC"}
    assert first(result, "00100010") == {"Alphabetic": "BON^NOM"}
    [found] = web.get("/dicom-web/studies", params={"ReferringPhysicianName": "durand^luc",
                                                    "fuzzymatching": "true"}).json()
    assert first(found, "0020000D") == study
    [one] = web.get(f"/dicom-web/studies/{study}/series").json()
    assert first(one, "0008103E") == "ABDOMEN"
    contents = load_study_contents(web.store.index, study)
    assert contents is not None
    assert contents.accession_number == "ACC-FIXED"
    assert [request.accession for request in contents.series[0].requests] == [
        "ACC-FIXED"]


def test_an_index_of_v5_reads_the_patient_module_from_the_next_readable_instance(
        tmp_path: Path) -> None:
    """The first instance of a migrated study unreadable: its patient module is read from
    the next one, not left as the first study of its Patient ID showed it (review 3,
    finding 10)."""
    data = tmp_path / "data"
    blobs = BlobStore(data)
    db = index_at_version(data / "index.sqlite", 5)
    db.execute("INSERT INTO patients VALUES (1, 'P6', 'HOSP', '', 'NOIR^MARC', '19600606',"
               " 'M', '^noir^marc')")
    study, series = generate_uid(), generate_uid()
    db.execute("INSERT INTO studies (pk, study_uid, patient_pk, study_date, study_time,"
               " accession_number, accession_issuer, study_id, study_description,"
               " referring_physician, requested_procedure_ids, placer_order_numbers,"
               " first_received_at, last_received_at) VALUES"
               " (1, ?, 1, '', '', '', '', '', '', '', '', '', 0, 0)", (study,))
    db.execute("INSERT INTO series (pk, series_uid, study_pk, modality, series_description,"
               " body_part, series_date, series_time) VALUES (1, ?, 1, 'CT', '', '', '', '')",
               (series,))
    for number in (1, 2):
        ds = ct_slice(study, series, 1, number, size=4, patient_id="P6",
                      PatientName="NOIR^MARCELLE", PatientSex="F")
        relative = blobs.relative_path(study, series, ds.SOPInstanceUID)
        raw = part10(ds)
        blobs.put(relative, [raw[:200] if number == 1 else raw])  # the first: truncated
        db.execute("INSERT INTO instances (sop_uid, series_pk, sop_class_uid, transfer_syntax,"
                   " path, size, source, received_at) VALUES (?, 1, ?, ?, ?, ?, 'old', 0)",
                   (ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID,
                    relative, len(raw)))
    db.execute("PRAGMA user_version = 5")
    db.commit()
    db.close()
    with InProcessService(data) as service:
        [result] = service.get("/dicom-web/studies", params={"StudyInstanceUID": study}).json()
        assert first(result, "00100010") == {"Alphabetic": "NOIR^MARCELLE"}
        assert first(result, "00100040") == "F"
        assert service.store.index.patient_modules_to_read() == []


# --- writers racing on one study, on each dialect -------------------------------------------

def _record(ds: Dataset) -> InstanceRecord:
    return read_header(bytes(part10(ds)))


def _add(index: Index, ds: Dataset) -> None:
    index.add_instance(_record(ds), f"{ds.SOPInstanceUID}.dcm", 1, "test")


def test_the_rows_an_upsert_meets_are_checked_again(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What another transaction committed between the identity check and the upserts (on
    PostgreSQL, READ COMMITTED, both may pass the check): the study under another patient,
    the series in another study, the instance in another series are refused by the upserts
    themselves, and nothing of the refused instance is written."""
    index = Index(Database(database_url))
    try:
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        _add(index, ct_slice(study, series, 1, 1, size=4, patient_id="FIRST", sop_uid=sop))
        monkeypatch.setattr(storage.index, "_identity_conflict", lambda db, record: None)
        intruders = {
            "PatientID": ct_slice(study, generate_uid(), 1, 1, size=4, patient_id="SECOND"),
            "SeriesInstanceUID": ct_slice(generate_uid(), series, 1, 2, size=4,
                                          patient_id="FIRST"),
            "SOPInstanceUID": ct_slice(study, generate_uid(), 1, 1, size=4,
                                       patient_id="FIRST", sop_uid=sop),
        }
        for keyword, intruder in intruders.items():
            with pytest.raises(IdentityConflictError) as refused:
                _add(index, intruder)
            assert refused.value.conflict.keyword == keyword
        counts = index.fetch("SELECT (SELECT count(*) FROM patients),"
                             " (SELECT count(*) FROM studies), (SELECT count(*) FROM series),"
                             " (SELECT count(*) FROM instances)")
        assert tuple(counts[0]) == (1, 1, 1, 1)
        assert index.find_instance(sop).series_uid == series
    finally:
        index.close()


def test_two_replicas_adding_one_new_study_for_two_patients_keep_one(database_url: str
                                                                      ) -> None:
    """Two indexes on one database (two replicas' connections), each adding the first
    instance of one new study under another Patient ID at the same moment: one is stored,
    the other refused, every time."""
    indexes = [Index(Database(database_url)) for _ in range(2)]
    barrier = threading.Barrier(2)

    def add(index: Index, ds: Dataset) -> str:
        barrier.wait()
        try:
            _add(index, ds)
        except IdentityConflictError as exc:
            return exc.conflict.keyword
        return "stored"

    try:
        for _ in range(20):
            study = generate_uid()
            firsts = [ct_slice(study, generate_uid(), 1, 1, size=4, patient_id=patient)
                      for patient in ("A", "B")]
            with ThreadPoolExecutor(2) as pool:
                outcomes = sorted(pool.map(add, indexes, firsts))
            assert outcomes == ["PatientID", "stored"]
            assert len(indexes[0].instances(study)) == 1
    finally:
        for index in indexes:
            index.close()
