"""Settings: the documented default file, precedence, validation."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.config import Settings
from tests.processes import REPO

DEFAULT_FILE = REPO / "config" / "passerelle.toml"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PASSERELLE_"):
            monkeypatch.delenv(name)


def test_default_file_documents_every_setting_with_its_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    documented = tomllib.loads(DEFAULT_FILE.read_text())
    assert set(documented) == set(Settings.model_fields)
    monkeypatch.setenv("PASSERELLE_CONFIG", str(DEFAULT_FILE))
    from_file = Settings()
    monkeypatch.delenv("PASSERELLE_CONFIG")
    assert from_file == Settings()


def test_secure_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSERELLE_CONFIG", str(REPO / "config" / "secure.toml"))
    settings = Settings()
    assert settings.auth_issuer and settings.dicom_tls and settings.tls_client_ca_file
    assert settings.certificate_scopes() == {"drimbox-conso.example.fr":
                                             frozenset({"dicomweb.read"})}


def test_contract_defaults() -> None:
    settings = Settings()
    assert (settings.ae_title, settings.dicom_port) == ("PASSERELLE", 11112)
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8080)
    assert settings.stable_seconds == 60
    assert settings.public_url == "http://127.0.0.1:8080"
    assert settings.registry_url == ""


def test_environment_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "p.toml"
    config.write_text('ae_title = "FROMFILE"\ndicom_port = 4242\n')
    monkeypatch.setenv("PASSERELLE_CONFIG", str(config))
    monkeypatch.setenv("PASSERELLE_DICOM_PORT", "104")
    monkeypatch.setenv("PASSERELLE_ALLOWED_CALLING_AETS", "PACS1, CT_ROOM2")
    monkeypatch.setenv("PASSERELLE_PUBLIC_URL", "https://imaging.example.org/")
    settings = Settings()
    assert settings.ae_title == "FROMFILE"
    assert settings.dicom_port == 104
    assert settings.allowed_calling_aets == ["PACS1", "CT_ROOM2"]
    assert settings.public_url == "https://imaging.example.org"


@pytest.mark.parametrize("variable, value", [
    ("PASSERELLE_AE_TITLE", "MUCH_TOO_LONG_AE_TITLE"),
    ("PASSERELLE_DICOM_PORT", "70000"),
    ("PASSERELLE_DUPLICATE_POLICY", "sometimes"),
    ("PASSERELLE_ALLOWED_CALLING_AETS", "OK,BAD\\AE"),
])
def test_invalid_settings_stop_the_command_with_a_message(variable: str, value: str,
                                                         tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", variable: value, "PASSERELLE_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "studies"], env=env,
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "--config",
                             str(tmp_path / "nope.toml"), "studies"], cwd=REPO,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "config file not found" in result.stderr
