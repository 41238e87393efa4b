"""C-ECHO and C-STORE against a running ``passerelle serve`` (pynetdicom and dcmtk SCUs)."""

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, generate_uid

from tests.conftest import _local_test_files
from tests.processes import PasserelleProcess, free_port, wait_for
from tests.scu import associate, send
from tests.synthetic import ct_slice


def stored_files(server: PasserelleProcess) -> list[Path]:
    """Every Part 10 file under the data dir, and fail if a temp file is left."""
    assert list((server.data_dir / "tmp").iterdir()) == []
    return sorted((server.data_dir / "studies").rglob("*.dcm"))


def studies(server: PasserelleProcess) -> list[dict]:
    result = server.cli("studies", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasserelleProcess]:
    """One service for the tests that compare its state before and after what they send,
    instead of with an empty store (a process start each would be most of their time)."""
    with PasserelleProcess(tmp_path_factory.mktemp("dimse") / "data") as process:
        yield process


def test_echo_with_pynetdicom_and_echoscu(shared: PasserelleProcess) -> None:
    server = shared
    assoc = associate(server.dicom_port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    result = subprocess.run(["echoscu", "-aec", "PASSERELLE", "127.0.0.1",
                             str(server.dicom_port)], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr


def test_every_transfer_syntax_is_stored_as_received(
        server: PasserelleProcess, files_by_syntax: dict[UID, Path]) -> None:
    assert len(files_by_syntax) >= 10  # implicit/explicit/big endian, deflate, JPEG family...
    for source in files_by_syntax.values():
        assert send(server.dicom_port, source) == (0x0000, "")
    stored = {dcmread(f).SOPInstanceUID: f for f in stored_files(server)}
    assert len(stored) == len(files_by_syntax)
    for syntax, source in files_by_syntax.items():
        original = dcmread(source)
        copy = stored[original.SOPInstanceUID]
        assert dcmread(copy).file_meta.TransferSyntaxUID == syntax
        # The data set is byte-identical: no transcoding, no re-encoding.
        assert _dataset_part(copy.read_bytes()) == _dataset_part(source.read_bytes()), syntax.name


def test_retired_storage_classes_are_accepted(shared: PasserelleProcess) -> None:
    server = shared
    # Archives still hold objects of retired classes, e.g. Ultrasound Image Storage (Retired).
    retired = next(p for p in _local_test_files() if p.name == "color-px.dcm")
    assert read_file_meta_info(retired).MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.6"
    assert send(server.dicom_port, retired) == (0x0000, "")


def _dataset_part(raw: bytes) -> bytes:
    """Bytes after the file meta group, located by its (0002,0000) group length."""
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


def test_storescu_study_is_indexed(server: PasserelleProcess, ct_study: list[Path]) -> None:
    result = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "PASSERELLE",
                             "127.0.0.1", str(server.dicom_port), *map(str, ct_study)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    [study] = studies(server)
    first = dcmread(ct_study[0])
    assert study["study_uid"] == first.StudyInstanceUID
    assert (study["patient_id"], study["issuer_of_patient_id"]) == ("PAT001", "HOSP")
    assert study["patient_name"] == "DUPONT^JEAN"
    assert (study["accession_number"], study["study_date"]) == ("ACC001", "20260110")
    assert study["modalities"] == ["CT"]
    assert (study["series_count"], study["instance_count"]) == (3, 15)
    assert len(stored_files(server)) == 15
    assert server.metric("passerelle_instances_received_total", protocol="dimse") == 15
    assert server.metric("passerelle_received_bytes_total", protocol="dimse") == sum(
        f.stat().st_size for f in stored_files(server))
    table = server.cli("studies").stdout
    assert "DUPONT^JEAN" in table and "ACC001" in table


def _garbage_dataset_file(tmp_path: Path) -> Path:
    """Valid file meta followed by a sequence whose item has no item tag."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    path = tmp_path / "garbage.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    offset = raw.index(b"\x08\x00\x16\x00")  # first element after the meta: (0008,0016)
    bad_sequence = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\x01\x02\x03\x04\x00\x00\x00\x00"
    path.write_bytes(raw[:offset] + bad_sequence)
    return path


def _mismatched_file(tmp_path: Path) -> Path:
    """File meta announcing another SOP Instance UID than the data set's."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8, sop_uid="1.2.3.4.5.100")
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes().replace(b"1.2.3.4.5.100", b"1.2.3.4.5.200", 1))
    return path


def _slice_with(**changes: object) -> object:
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


REJECTIONS = {
    "missing study uid": (lambda tmp: _slice_with(StudyInstanceUID=None), 0xA900,
                          "missing-uid", "StudyInstanceUID is missing"),
    "missing series uid": (lambda tmp: _slice_with(SeriesInstanceUID=None), 0xA900,
                           "missing-uid", "SeriesInstanceUID is missing"),
    "letters in uid": (lambda tmp: _slice_with(StudyInstanceUID="1.2.abc"), 0xA900,
                       "invalid-uid", "invalid Study UID"),
    "path traversal": (lambda tmp: _slice_with(SeriesInstanceUID="1.2/../../../etc"), 0xA900,
                       "invalid-uid", "invalid Series UID"),
    "uid over 64 chars": (lambda tmp: _slice_with(StudyInstanceUID="1." + "2" * 70), 0xA900,
                          "invalid-uid", "invalid Study UID"),
    "instance uid mismatch": (_mismatched_file, 0xA900, "uid-mismatch", "differs from"),
    "unparseable data set": (_garbage_dataset_file, 0xC000, "unreadable", "cannot parse"),
}


@pytest.mark.parametrize("case", REJECTIONS)
def test_bad_input_is_refused_and_leaves_nothing(shared: PasserelleProcess, tmp_path: Path,
                                                 case: str) -> None:
    server = shared
    make, code, reason, comment = REJECTIONS[case]
    files, listed, log = stored_files(server), studies(server), len(server.log())
    failures = server.metric("passerelle_ingest_failures_total", protocol="dimse",
                             reason=reason)
    status, error_comment = send(server.dicom_port, make(tmp_path))
    assert status == code
    assert comment in error_comment
    assert stored_files(server) == files  # nothing more, and tmp/ empty
    assert studies(server) == listed
    assert server.metric("passerelle_ingest_failures_total", protocol="dimse",
                         reason=reason) == failures + 1
    assert "refused" in server.log()[log:]
    # The server keeps serving.
    good = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    assert send(server.dicom_port, good) == (0x0000, "")


def test_duplicates_keep_first_and_are_counted(shared: PasserelleProcess) -> None:
    server = shared
    files, log = stored_files(server), len(server.log())
    duplicates = server.metric("passerelle_duplicate_instances_total", kind="duplicate")
    conflicts = server.metric("passerelle_ingest_failures_total", protocol="dimse",
                              reason="sop-instance-conflict")
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    assert send(server.dicom_port, ds)[0] == 0x0000
    assert send(server.dicom_port, ds)[0] == 0x0000
    assert server.metric("passerelle_duplicate_instances_total",
                         kind="duplicate") == duplicates + 1
    ds.PatientName = "OTHER^NAME"
    # Another data set under a stored UID is refused, Duplicate SOP Instance (PS3.7 C.4).
    assert send(server.dicom_port, ds)[0] == 0x0111
    assert server.metric("passerelle_ingest_failures_total", protocol="dimse",
                         reason="sop-instance-conflict") == conflicts + 1
    assert "sop-instance-conflict" in server.log()[log:]
    [path] = [f for f in stored_files(server) if f not in files]
    assert dcmread(path).PatientName == "DUPONT^JEAN"


def test_overwrite_policy_replaces(tmp_path: Path) -> None:
    server = PasserelleProcess(tmp_path / "data", duplicate_policy="overwrite").start()
    try:
        ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
        assert send(server.dicom_port, ds)[0] == 0x0000
        ds.PatientName = "OTHER^NAME"
        assert send(server.dicom_port, ds)[0] == 0x0000
        [path] = stored_files(server)
        assert dcmread(path).PatientName == "OTHER^NAME"
        assert studies(server)[0]["instance_count"] == 1
    finally:
        server.stop()


def test_calling_ae_allowlist(tmp_path: Path) -> None:
    server = PasserelleProcess(tmp_path / "data", allowed_calling_aets="CT1, PACS").start()
    try:
        refused = associate(server.dicom_port, calling="INTRUDER")
        assert refused.is_rejected
        accepted = associate(server.dicom_port, calling="PACS")
        assert accepted.is_established
        accepted.release()
        assert server.metric("passerelle_dicom_associations_total", outcome="rejected") == 1
    finally:
        server.stop()


def test_restart_keeps_every_acknowledged_instance(tmp_path: Path,
                                                   ct_study: list[Path]) -> None:
    server = PasserelleProcess(tmp_path / "data").start()
    for path in ct_study:
        assert send(server.dicom_port, path)[0] == 0x0000
    before = studies(server)
    assert server.stop() == 0
    assert "stopped" in server.log()
    server.start()
    try:
        assert studies(server) == before
        assert before[0]["instance_count"] == 15
    finally:
        server.stop()


def _killed_after_storing(tmp_path: Path, files: list[Path]) -> PasserelleProcess:
    """A service that stored ``files`` and was then killed with SIGKILL."""
    server = PasserelleProcess(tmp_path / "data").start()
    for path in files:
        assert send(server.dicom_port, path)[0] == 0x0000
    server.stop(signal.SIGKILL)
    return server


def test_index_lost_after_unclean_stop_is_rebuilt_from_files(tmp_path: Path,
                                                              ct_study: list[Path]) -> None:
    server = _killed_after_storing(tmp_path, ct_study[:6])
    # Simulate a power cut that lost the last index commits: drop the whole index.
    for leftover in (tmp_path / "data").glob("index.sqlite*"):
        leftover.unlink()
    (tmp_path / "data" / "studies" / "junk.dcm").write_bytes(b"not in a series folder")
    (tmp_path / "data" / "tmp" / "interrupted.part").write_bytes(b"half an instance")
    files = sorted((tmp_path / "data" / "studies").glob("*/*/*.dcm"))
    files[0].write_bytes(files[0].read_bytes()[:200])  # torn by something outside us
    server.start()
    try:
        [study] = studies(server)
        assert study["instance_count"] == 5
        assert "did not stop cleanly" in server.log()
        assert "removed 1 temporary file(s)" in server.log()
        assert f"quarantined studies/{files[0].parent.parent.name}" in server.log()
        assert (tmp_path / "data" / "quarantine" / files[0].name).exists()
        assert server.metric("passerelle_recovery_files", kind="reindexed") == 5
        assert server.metric("passerelle_recovery_files", kind="quarantined") == 1
        assert stored_files(server)  # also checks that tmp/ is empty
    finally:
        server.stop()


def test_an_indexed_instance_without_its_file_is_reported(tmp_path: Path,
                                                          ct_study: list[Path]) -> None:
    server = _killed_after_storing(tmp_path, ct_study[:3])
    lost = sorted((tmp_path / "data" / "studies").glob("*/*/*.dcm"))[0]
    lost.unlink()
    server.start()
    try:
        assert f"indexed instance has no file: {lost.relative_to(tmp_path / 'data')}" \
            in server.log()
        assert server.metric("passerelle_recovery_files", kind="missing") == 1
    finally:
        server.stop()


def test_sigterm_with_an_open_association(tmp_path: Path, ct_study: list[Path]) -> None:
    server = PasserelleProcess(tmp_path / "data", shutdown_grace_seconds="1").start()
    assoc = associate(server.dicom_port, ct_study[:3])
    assert assoc.is_established
    for path in ct_study[:3]:
        assert assoc.send_c_store(path).Status == 0x0000
    # The peer keeps the association open: after the grace period it is aborted.
    assert server.stop(signal.SIGTERM, timeout=20) == 0
    assert "aborting an established association with TESTSCU" in server.log()
    assoc.abort()
    server.start()
    try:
        assert studies(server)[0]["instance_count"] == 3
    finally:
        server.stop()


def test_health_and_metrics(server: PasserelleProcess) -> None:
    health = httpx.get(f"{server.base_url}/health")
    assert health.status_code == 200
    body = health.json()
    assert {key: body[key] for key in ("status", "unavailable", "dicom", "background", "http")
            } == {"status": "ok", "unavailable": [], "dicom": True, "background": True,
                  "http": True}
    assoc = associate(server.dicom_port)
    assert assoc.is_established
    assert server.metric("passerelle_dicom_associations_open") == 1
    assoc.release()
    wait_for(lambda: server.metric("passerelle_dicom_associations_open") == 0, 10,
             "the association to be counted as closed")
    assert server.metric("passerelle_dicom_associations_total", outcome="released") == 1


def test_busy_dicom_port_fails_clearly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server = PasserelleProcess(tmp_path / "data", dicom_port=str(sock.getsockname()[1]))
        with pytest.raises(RuntimeError, match="cannot serve"):
            server.start()


def test_second_server_on_same_data_dir_is_refused(shared: PasserelleProcess) -> None:
    server = shared
    other = PasserelleProcess(server.data_dir, dicom_port=str(free_port()))
    with pytest.raises(RuntimeError, match="used by another passerelle serve"):
        other.start()
    assert server.healthy()


@pytest.fixture
def tiny_disk(tmp_path: Path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs",
                             str(mount_point)], capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_answers_out_of_resources(tiny_disk: Path) -> None:
    server = PasserelleProcess(tiny_disk / "data").start()
    try:
        big = ct_slice(generate_uid(), generate_uid(), 1, 1, size=1024)  # 2 MB of pixels
        status, comment = send(server.dicom_port, big)
        assert status == 0xA700
        assert "disk" in comment
        assert stored_files(server) == []
        assert server.metric("passerelle_ingest_failures_total", protocol="dimse",
                      reason="disk-full") == 1
        small = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
        assert send(server.dicom_port, small) == (0x0000, "")
    finally:
        server.stop()
