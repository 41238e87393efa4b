"""Settings: the documented default file, precedence, validation."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import FLAT_NAMES, Settings
from gateway.dicom.peer import DicomPeer, Retrieve
from storage.store import DuplicatePolicy
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
    for section, model in Settings.sections.items():
        assert set(documented[section]) == set(model.model_fields), section
    monkeypatch.setenv("PASSERELLE_CONFIG", str(DEFAULT_FILE))
    from_file = Settings()
    monkeypatch.delenv("PASSERELLE_CONFIG")
    assert from_file == Settings()


def test_secure_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSERELLE_CONFIG", str(REPO / "config" / "secure.toml"))
    settings = Settings()
    assert settings.auth.issuer and settings.dicom.tls and settings.tls.client_ca_file
    assert settings.auth.certificate_scopes() == {"drimbox-conso.example.fr":
                                             frozenset({"dicomweb.read"})}


def test_contract_defaults() -> None:
    settings = Settings()
    assert (settings.dicom.ae_title, settings.dicom.port) == ("PASSERELLE", 11112)
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8080)
    assert settings.publication.stable_seconds == 60
    assert settings.http.public_url == "http://127.0.0.1:8080"
    assert settings.publication.registry_url == ""


def test_environment_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "p.toml"
    config.write_text('ae_title = "FROMFILE"\ndicom_port = 4242\n')
    monkeypatch.setenv("PASSERELLE_CONFIG", str(config))
    monkeypatch.setenv("PASSERELLE_DICOM_PORT", "104")
    monkeypatch.setenv("PASSERELLE_ALLOWED_CALLING_AETS", "PACS1, CT_ROOM2")
    monkeypatch.setenv("PASSERELLE_PUBLIC_URL", "https://imaging.example.org/")
    settings = Settings()
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.dicom.port == 104
    assert settings.dicom.allowed_calling_aets == ["PACS1", "CT_ROOM2"]
    assert settings.http.public_url == "https://imaging.example.org"


def test_sections_and_flat_names_in_a_file(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "p.toml"
    config.write_text('http_port = 9000\n[dicom]\nport = 4242\nae_title = "SECTIONED"\n'
                      '[auth]\nallowed_subjects = ["alice"]\n')
    monkeypatch.setenv("PASSERELLE_CONFIG", str(config))
    monkeypatch.setenv("PASSERELLE_AE_TITLE", "FROMENV")
    settings = Settings()
    assert (settings.dicom.port, settings.dicom.ae_title) == (4242, "FROMENV")
    assert settings.http.port == 9000
    assert settings.http.public_url == "http://127.0.0.1:9000"
    assert settings.auth.allowed_subjects == ["alice"]


def test_every_flat_name_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    by_type = {"str": ("1.2.250.1.999.7", "1.2.250.1.999.7"), "int": ("7", 7),
               "float": ("7.5", 7.5), "bool": ("true", True),
               "list": ("A1, B2", ["A1", "B2"])}
    # (variable value, setting value) where a setting's own rules need something else
    special = {"duplicate_policy": ("overwrite", DuplicatePolicy.OVERWRITE),
               "auth_client_certificates": ("cn=dicomweb.read", ["cn=dicomweb.read"]),
               "tls_client_ca_file": ("/ca.pem", "/ca.pem"),
               "tls_cert_file": ("/c.pem", "/c.pem"), "tls_key_file": ("/k.pem", "/k.pem"),
               "registry_client_cert_file": ("/rc.pem", "/rc.pem"),
               "registry_client_key_file": ("/rk.pem", "/rk.pem"),
               "confidentiality": ("R", "R"), "masking_codes": ("MASQUE_PS", ["MASQUE_PS"]),
               "organization_finess": ("750712184", "750712184"),
               "auth_issuer": ("https://issuer.example", "https://issuer.example"),
               "auth_jwks_url": ("https://jwks.example", "https://jwks.example"),
               "auth_audience": ("passerelle", "passerelle"),
               "auth_session_max_age_seconds": ("3600", 3600),
               "auth_session_secret": ("s" * 32, "s" * 32),
               "audit_syslog": ("siem.example:6514", "siem.example:6514"),
               "audit_syslog_transport": ("tls", "tls"),
               "public_url": ("https://imaging.example/", "https://imaging.example"),
               "viewer_dir": ("/opt/ohif", Path("/opt/ohif")),
               "pacs": ("PACS@pacs.example:104/get, P2@[::1]:11112",
                        [DicomPeer("PACS", "pacs.example", 104, Retrieve.GET),
                         DicomPeer("P2", "::1", 11112, Retrieve.MOVE)]),
               "move_destinations": ("VIEWER@10.0.0.5:104",
                                     [DicomPeer("VIEWER", "10.0.0.5", 104)])}
    expected = {}
    for flat, (section, field) in FLAT_NAMES.items():
        annotation = Settings.sections[section].model_fields[field].annotation
        value, expected[flat] = special.get(flat) or by_type[getattr(annotation, "__name__",
                                                                     "str")]
        monkeypatch.setenv(f"PASSERELLE_{flat.upper()}", value)
    settings = Settings()
    for flat, (section, field) in FLAT_NAMES.items():
        assert getattr(getattr(settings, section), field) == expected[flat], flat


def test_a_setting_given_twice_in_one_source_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "p.toml"
    config.write_text('dicom_port = 1\n[dicom]\nport = 2\n')
    monkeypatch.setenv("PASSERELLE_CONFIG", str(config))
    with pytest.raises(ValueError, match=r"dicom_port is given twice"):
        Settings()


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


def test_invalid_setting_is_named_as_the_operator_writes_it(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PASSERELLE_HTTP_MAX_CONNECTIONS": "0",
           "PASSERELLE_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "studies"], env=env,
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "http_max_connections (PASSERELLE_HTTP_MAX_CONNECTIONS)" in result.stderr


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "--config",
                             str(tmp_path / "nope.toml"), "studies"], cwd=REPO,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "config file not found" in result.stderr


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@host:104", "PACS@host:0",
                                  "PACS@host:70000", "PACS@host:104/find",
                                  "A_TITLE_OF_17_CHARS@host:104", "P\\X@host:104"])
def test_a_malformed_peer_is_refused_with_what_is_wrong(text: str) -> None:
    with pytest.raises(ValidationError, match=r"AE|port|move nor get"):
        Settings(pacs=[text])
