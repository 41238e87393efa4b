"""``passerelle import`` and ``passerelle studies`` on real files and folders."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.processes import REPO


def passerelle(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PASSERELLE_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def export_folder(tmp_path: Path, ct_study: list[Path]) -> Path:
    """A PACS export: the CT study in nested folders, a DICOMDIR, and two bad files."""
    folder = tmp_path / "export"
    for index, path in enumerate(ct_study):
        target = folder / f"SER{index // 5}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    (folder / "notes.txt").write_text("not DICOM")
    truncated = folder / "SER0" / "truncated.dcm"
    truncated.write_bytes(ct_study[0].read_bytes()[:200])
    return folder


def test_import_reports_and_fails_on_rejections(tmp_path: Path, export_folder: Path) -> None:
    data = tmp_path / "data"
    result = passerelle(data, "import", str(export_folder))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "imported: 15" in result.stdout
    assert "skipped (DICOMDIR): 1" in result.stdout
    assert "rejected: 2" in result.stdout
    assert "notes.txt: not-part10" in result.stdout
    assert "truncated.dcm" in result.stdout
    [study] = json.loads(passerelle(data, "studies", "--json").stdout)
    assert (study["series_count"], study["instance_count"]) == (3, 15)
    stored = sorted((data / "studies").rglob("*.dcm"))
    assert len(stored) == 15
    assert {dcmread(p).SOPInstanceUID for p in stored} == {
        dcmread(p).SOPInstanceUID for p in export_folder.rglob("s*.dcm")}


def test_reimport_counts_duplicates_and_succeeds(tmp_path: Path, ct_study: list[Path]) -> None:
    data = tmp_path / "data"
    assert passerelle(data, "import", *map(str, ct_study)).returncode == 0
    again = passerelle(data, "import", str(ct_study[0].parent))
    assert again.returncode == 0, again.stdout
    assert "imported: 0" in again.stdout and "duplicates: 15" in again.stdout


def test_missing_path_is_a_rejection(tmp_path: Path) -> None:
    result = passerelle(tmp_path / "data", "import", str(tmp_path / "nowhere.dcm"))
    assert result.returncode == 1
    assert "unreadable-file" in result.stdout


def test_studies_on_an_empty_store(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    result = passerelle(tmp_path / "data", "studies")
    assert result.returncode == 0
    assert result.stdout.strip() == "no study stored"
    assert json.loads(passerelle(tmp_path / "data", "studies", "--json").stdout) == []


def test_import_beside_a_running_service(server, ct_study: list[Path], tmp_path: Path) -> None:
    from tests.synthetic import write_ct_study

    other = write_ct_study(tmp_path / "other", series=1, per_series=20, patient_id="PAT002")
    sending = subprocess.Popen(["storescu", "-aec", "PASSERELLE", "127.0.0.1",
                                str(server.dicom_port), *map(str, ct_study)],
                               stderr=subprocess.PIPE)
    imported = server.cli("import", str(tmp_path / "other"))
    assert sending.wait(60) == 0, sending.stderr.read() if sending.stderr else ""
    assert imported.returncode == 0, imported.stdout + imported.stderr
    listed = {s["patient_id"]: s["instance_count"]
              for s in json.loads(server.cli("studies", "--json").stdout)}
    assert listed == {"PAT001": 15, "PAT002": len(other)}
