"""The Query/Retrieve SCP (PS3.4 Annex C) of a running ``passerelle serve``, against real
peers: dcmtk's findscu, getscu, movescu and a storescp destination, and pynetdicom."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from gateway.security.audit import read_events
from tests.processes import PasserelleProcess, free_port, wait_for
from tests.scu import associate, send
from tests.synthetic import ct_slice, write_ct_study

CALLERS = "FINDSCU,GETSCU,MOVESCU,TESTSCU,QRSCU"
# PS3.4 Table C.6-5 (Study Root, Study level): the Required keys and the Unique key.
STUDY_ROOT_STUDY_KEYS = ["StudyDate", "StudyTime", "AccessionNumber", "PatientName",
                         "PatientID", "StudyID", "StudyInstanceUID"]
_BIG_STUDY = 400  # instances of the study a cancelled C-FIND lists


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A dcmtk storescp, AE VIEWER, storing what it receives in a folder."""
    folder = tmp_path_factory.mktemp("viewer")
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "VIEWER", "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "VIEWER", "127.0.0.1", str(port)],
                                        capture_output=True).returncode == 0, 10, "storescp")
        yield port, folder
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Study A (PAT001, 20260110: 2 series of 3, Implicit VR Little Endian), study B (PAT002,
    20250305, one instance, Explicit VR Little Endian, which a C-GET SCU proposing several
    native syntaxes is accepted in) and a big one (PAT003) of _BIG_STUDY tiny ones."""
    folder = tmp_path_factory.mktemp("qr")
    a = write_ct_study(folder / "a", series=2, per_series=3)
    for path in a:
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    b_uid, b_series = generate_uid(), generate_uid()
    b = folder / "b.dcm"
    ct_slice(b_uid, b_series, 1, 1, size=8, patient_id="PAT002", accession="ACC002",
             PatientName="MARTIN^ALICE", StudyDate="20250305").save_as(
        b, enforce_file_format=True)
    big_uid, big_series = generate_uid(), generate_uid()
    big = []
    for number in range(1, _BIG_STUDY + 1):
        path = folder / "big" / f"{number}.dcm"
        path.parent.mkdir(exist_ok=True)
        ct_slice(big_uid, big_series, 1, number, size=2, patient_id="PAT003",
                 PatientName="BIG^STUDY").save_as(path, enforce_file_format=True)
        big.append(path)
    return {"a": a, "b": [b], "big": big}


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory, studies: dict[str, list[Path]],
       destination: tuple[int, Path]) -> Iterator[PasserelleProcess]:
    """A service holding the studies, with an allowlist and VIEWER as move destination."""
    port, _ = destination
    with PasserelleProcess(tmp_path_factory.mktemp("qr-scp") / "data",
                           allowed_calling_aets=CALLERS,
                           move_destinations=f"VIEWER@127.0.0.1:{port}") as server:
        for path in [*studies["a"], *studies["b"]]:
            assert send(server.dicom_port, path)[0] == 0x0000
        assoc = associate(server.dicom_port, studies["big"][:1])
        try:
            for path in studies["big"]:
                assert assoc.send_c_store(path).Status == 0x0000
        finally:
            assoc.release()
        yield server


def _uid(paths: list[Path], keyword: str) -> str:
    return str(dcmread(paths[0], stop_before_pixels=True).get(keyword))


def findscu(server: PasserelleProcess, root: str, keys: list[str], out: Path,
            calling: str = "FINDSCU") -> tuple[subprocess.CompletedProcess[str],
                                               list[Dataset]]:
    """Run findscu (-P or -S) with ``keys``; its run and the responses it extracted."""
    out.mkdir(parents=True, exist_ok=True)
    args = [arg for key in keys for arg in ("-k", key)]
    run = subprocess.run(["findscu", "-v", root, "-aet", calling, "-aec", server.ae_title, "-X",
                          "-od", str(out), *args, "127.0.0.1", str(server.dicom_port)],
                         capture_output=True, text=True, timeout=60)
    return run, [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def _values(responses: list[Dataset], keyword: str) -> list[str]:
    return sorted(str(ds.get(keyword, "")) for ds in responses)


def test_find_every_level_both_roots(qr: PasserelleProcess, studies: dict[str, list[Path]],
                                     tmp_path: Path) -> None:
    a, b = _uid(studies["a"], "StudyInstanceUID"), _uid(studies["b"], "StudyInstanceUID")
    series = sorted({_uid([p], "SeriesInstanceUID") for p in studies["a"]})
    in_series = [p for p in studies["a"] if _uid([p], "SeriesInstanceUID") == series[0]]
    sops = [_uid([p], "SOPInstanceUID") for p in in_series]

    def find(root: str, *keys: str) -> list[Dataset]:
        run, responses = findscu(qr, root, list(keys), tmp_path / str(find.calls))
        find.calls += 1
        assert run.returncode == 0, run.stderr
        return responses
    find.calls = 0  # type: ignore[attr-defined]

    # Patient Root, PATIENT level: wild card; only the keys asked for come back.
    patients = find("-P", "QueryRetrieveLevel=PATIENT", "PatientID=PAT00?", "PatientName")
    assert _values(patients, "PatientID") == ["PAT001", "PAT002", "PAT003"]
    assert all(set(ds.dir()) <= {"QueryRetrieveLevel", "PatientID", "PatientName",
                                 "SpecificCharacterSet"} for ds in patients)
    assert _values(find("-P", "QueryRetrieveLevel=PATIENT", "PatientName=DUPONT*",
                        "PatientID"), "PatientID") == ["PAT001"]
    # Patient Root, STUDY level: the patient's unique key above, a date range.
    found = find("-P", "QueryRetrieveLevel=STUDY", "PatientID=PAT001",
                 "StudyDate=20260101-20261231", "StudyInstanceUID",
                 "NumberOfStudyRelatedInstances")
    assert _values(found, "StudyInstanceUID") == [a]
    assert found[0].NumberOfStudyRelatedInstances == 6
    # Patient Root, SERIES and IMAGE levels.
    assert _values(find("-P", "QueryRetrieveLevel=SERIES", "PatientID=PAT001",
                        f"StudyInstanceUID={a}", "SeriesInstanceUID"),
                   "SeriesInstanceUID") == series
    assert _values(find("-P", "QueryRetrieveLevel=IMAGE", "PatientID=PAT001",
                        f"StudyInstanceUID={a}", f"SeriesInstanceUID={series[0]}",
                        "SOPInstanceUID"), "SOPInstanceUID") == sorted(sops)
    # Study Root, STUDY level: an open date range, a list of UIDs, wild cards in a name.
    assert _values(find("-S", "QueryRetrieveLevel=STUDY", "StudyDate=-20251231",
                        "StudyInstanceUID"), "StudyInstanceUID") == [b]
    assert _values(find("-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={a}\\{b}"),
                   "StudyInstanceUID") == sorted([a, b])
    assert _values(find("-S", "QueryRetrieveLevel=STUDY", "PatientName=DUP?NT^J*",
                        "StudyInstanceUID"), "StudyInstanceUID") == [a]
    # Study Root, SERIES and IMAGE levels.
    numbered = find("-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={a}",
                    "SeriesNumber=2", "SeriesInstanceUID", "Modality")
    assert len(numbered) == 1 and numbered[0].Modality == "CT"
    assert _values(find("-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={a}",
                        f"SeriesInstanceUID={series[0]}",
                        f"SOPInstanceUID={sops[0]}\\{sops[1]}"),
                   "SOPInstanceUID") == sorted(sops[:2])
    assert qr.metric("passerelle_dimse_queries_total", level="image",
                     result="success") >= 2


def test_study_level_returns_the_required_keys_of_table_c6_5(
        qr: PasserelleProcess, studies: dict[str, list[Path]], tmp_path: Path) -> None:
    a = _uid(studies["a"], "StudyInstanceUID")
    run, responses = findscu(qr, "-S", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={a}",
                                        *STUDY_ROOT_STUDY_KEYS[:-1]], tmp_path)
    assert run.returncode == 0, run.stderr
    [found] = responses
    stored = dcmread(studies["a"][0], stop_before_pixels=True)
    for keyword in STUDY_ROOT_STUDY_KEYS:
        assert str(found[keyword].value) == str(stored[keyword].value), keyword


def test_find_refusals(qr: PasserelleProcess, tmp_path: Path) -> None:
    # Hierarchical: a series query needs its study's unique key (PS3.4 C.4.1.3.1).
    run, responses = findscu(qr, "-S", ["QueryRetrieveLevel=SERIES", "SeriesInstanceUID"],
                             tmp_path / "series")
    assert not responses and "DataSetDoesNotMatchSOPClass" in run.stdout + run.stderr
    # No PATIENT level in the Study Root model.
    run, _ = findscu(qr, "-S", ["QueryRetrieveLevel=PATIENT", "PatientID"], tmp_path / "p")
    assert "DataSetDoesNotMatchSOPClass" in run.stdout + run.stderr
    # A calling AE title outside the allowlist: the association is rejected.
    run, responses = findscu(qr, "-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"],
                             tmp_path / "bad", calling="INTRUDER")
    assert run.returncode != 0 and not responses
    assert "Association Rejected" in run.stdout + run.stderr


def getscu(server: PasserelleProcess, study_uid: str, out: Path) -> dict[str, Dataset]:
    """Run getscu (Study Root, STUDY level) into ``out``; what it received, by SOP UID."""
    out.mkdir(parents=True)
    run = subprocess.run(["getscu", "-S", "-aet", "GETSCU", "-aec", server.ae_title, "-od",
                          str(out), "-k", "QueryRetrieveLevel=STUDY", "-k",
                          f"StudyInstanceUID={study_uid}", "127.0.0.1",
                          str(server.dicom_port)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return {ds.SOPInstanceUID: ds for ds in map(dcmread, out.iterdir())}


def test_getscu_retrieves_a_study_as_stored(qr: PasserelleProcess,
                                            studies: dict[str, list[Path]],
                                            tmp_path: Path) -> None:
    # getscu proposes the native syntaxes; Explicit VR is accepted (scp.py): study B
    # (Explicit VR) goes as stored, study A (Implicit VR) transcoded, the same data sets.
    [(uid, got)] = getscu(qr, _uid(studies["b"], "StudyInstanceUID"), tmp_path / "b").items()
    original = dcmread(studies["b"][0])
    assert original.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got == original and got.PixelData == original.PixelData
    assert qr.metric("passerelle_dimse_retrieved_instances_total", service="get",
                     result="sent") >= 1
    received = getscu(qr, _uid(studies["a"], "StudyInstanceUID"), tmp_path / "a")
    originals = {ds.SOPInstanceUID: ds for ds in map(dcmread, studies["a"])}
    assert received.keys() == originals.keys()
    for uid, original in originals.items():
        got = received[uid]
        assert original.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got == original  # every element of the data set
        assert got.PixelData == original.PixelData
    assert qr.metric("passerelle_dimse_retrieved_instances_total", service="get",
                     result="transcoded") == len(originals)


def test_movescu_to_a_configured_destination(qr: PasserelleProcess,
                                             studies: dict[str, list[Path]],
                                             destination: tuple[int, Path]) -> None:
    _, folder = destination
    a = _uid(studies["a"], "StudyInstanceUID")
    run = subprocess.run(["movescu", "-S", "-aet", "MOVESCU", "-aec", qr.ae_title, "-aem",
                          "VIEWER", "-k", "QueryRetrieveLevel=STUDY", "-k",
                          f"StudyInstanceUID={a}", "127.0.0.1", str(qr.dicom_port)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    wanted = {_uid([p], "SOPInstanceUID") for p in studies["a"]}
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in folder.iterdir()}
    assert wanted <= received.keys()
    for path in studies["a"]:
        original = dcmread(path)
        assert dcmread(received[str(original.SOPInstanceUID)]) == original

    def audited() -> list[dict]:
        return [m for m in read_events(qr.data_dir / "audit")
                if m["EventIdentification"]["EventID"]["csd-code"] == "110104"
                and "C-MOVE to VIEWER" in m["EventIdentification"].get(
                    "EventOutcomeDescription", "")]
    wait_for(audited, 10, "the C-MOVE audit event")
    assert "6 sent, 0 failed" in audited()[0]["EventIdentification"]["EventOutcomeDescription"]


def _qr_association(server: PasserelleProcess, *contexts: str) -> AE:
    ae = AE(ae_title="QRSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)


def test_move_to_an_unknown_destination(qr: PasserelleProcess,
                                        studies: dict[str, list[Path]]) -> None:
    assoc = _qr_association(qr, StudyRootQueryRetrieveInformationModelMove)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = _uid(studies["a"], "StudyInstanceUID")
    try:
        statuses = [int(status.Status) for status, _ in assoc.send_c_move(
            identifier, "NOBODY", StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    assert statuses == [0xA801]


def test_find_cancel(qr: PasserelleProcess, studies: dict[str, list[Path]]) -> None:
    assoc = _qr_association(qr, StudyRootQueryRetrieveInformationModelFind)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = _uid(studies["big"], "StudyInstanceUID")
    identifier.SeriesInstanceUID = _uid(studies["big"], "SeriesInstanceUID")
    identifier.SOPInstanceUID = ""
    context_id = assoc.accepted_contexts[0].context_id
    statuses = []
    try:
        for status, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind,
                                           msg_id=7):
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(7, context_id)
    finally:
        assoc.release()
    assert statuses[0] == 0xFF00 and statuses[-1] == 0xFE00
    assert len(statuses) < _BIG_STUDY + 1  # the matches stopped coming
    assert qr.metric("passerelle_dimse_queries_total", level="image", result="cancel") == 1


def test_beyond_loopback_query_retrieve_needs_an_allowlist_or_tls(tmp_path: Path) -> None:
    """C-FIND, C-GET and C-MOVE give every patient's data to whoever asks: on a listener
    beyond loopback they are offered only with allowed_calling_aets (or DICOM TLS); C-STORE
    and C-ECHO stay as they were."""
    models = [StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
              StudyRootQueryRetrieveInformationModelMove]
    for name, settings, offered in (("open", {}, False),
                                    ("listed", {"allowed_calling_aets": "GUARD"}, True)):
        with PasserelleProcess(tmp_path / name, dicom_host="0.0.0.0", **settings) as server:
            ae = AE(ae_title="GUARD")
            ae.add_requested_context(Verification)
            for model in models:
                ae.add_requested_context(model)
            assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="PASSERELLE")
            assert assoc.is_established
            accepted = {context.abstract_syntax for context in assoc.accepted_contexts}
            assoc.release()
            assert accepted - {Verification} == (set(models) if offered else set()), name
            if not offered:
                assert "query/retrieve (C-FIND, C-GET, C-MOVE) not offered" in server.log()
