"""Settings: code defaults < config file (TOML) < ``PASSERELLE_*`` environment variables.

``config/passerelle.toml`` documents every key with its default. The file is optional: it is
read from ``--config`` or ``PASSERELLE_CONFIG`` when given.
"""

import hashlib
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.publication.mhd import Confidentiality
from storage.store import DuplicatePolicy
from storage.uids import uid_from_digest

# An ISO OID (ITU-T X.660): digits and dots, no leading zero in a component.
_OID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")

# PS3.5 6.2: AE titles are up to 16 characters of the default repertoire, no backslash.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


def _ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.fullmatch(value):
        raise ValueError(f"invalid AE title {value!r}: 1 to 16 printable ASCII characters")
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Settings(BaseSettings):
    """Every setting of the service; environment variables are ``PASSERELLE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="PASSERELLE_", extra="forbid")

    data_dir: Path = Path("data")
    ae_title: str = "PASSERELLE"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = Field(11112, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    public_url: str = ""
    max_instance_bytes: int = Field(1 << 30, gt=0)
    cors_allow_origins: Annotated[list[str], NoDecode] = []
    render_cache_bytes: int = Field(512 << 20, ge=0)
    registry_url: str = ""
    stable_seconds: float = Field(60, gt=0)
    registry_timeout: float = Field(30, gt=0)
    registry_ca_file: str = ""
    registry_client_cert_file: str = ""
    registry_client_key_file: str = ""
    publish_retry_seconds: float = Field(10, gt=0)
    publish_retry_max_seconds: float = Field(3600, gt=0)
    gateway_oid: str = ""
    organization_name: str = "Service d'imagerie"
    organization_finess: str = ""
    patient_id_issuer_oid: str = ""
    accession_issuer_oid: str = ""
    order_issuer_oid: str = ""
    facility_type: str = "SA01"
    practice_setting: str = "ETABLISSEMENT"
    designation_type: str = "07"
    confidentiality: str = "N"
    masking_codes: Annotated[list[str], NoDecode] = []
    authenticator_idnps: str = ""
    authenticator_name: str = ""
    event_codes_file: str = ""
    allowed_calling_aets: Annotated[list[str], NoDecode] = []
    max_pdu: int = Field(262144, ge=0)
    max_associations: int = Field(16, ge=1)
    max_associations_per_client: int = Field(8, ge=1)
    http_max_requests_per_client: int = Field(64, ge=1)
    http_max_connections: int = Field(1024, ge=1)
    http_max_connections_per_client: int = Field(128, ge=1)
    http_head_timeout_seconds: float = Field(10, gt=0)
    http_keep_alive_seconds: float = Field(30, gt=0)
    acse_timeout: float = Field(30, gt=0)
    dimse_timeout: float = Field(60, gt=0)
    network_timeout: float = Field(120, gt=0)
    shutdown_grace_seconds: float = Field(10, ge=0)
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    log_level: str = "INFO"
    auth_issuer: str = ""
    auth_jwks_url: str = ""
    auth_audience: str = ""
    auth_read_scope: str = "dicomweb.read"
    auth_write_scope: str = "dicomweb.write"
    auth_admin_scope: str = "passerelle.admin"
    auth_leeway_seconds: float = Field(30, ge=0, le=300)
    auth_allowed_subjects: Annotated[list[str], NoDecode] = []
    metrics_require_auth: bool = False
    allow_unauthenticated: bool = False
    auth_client_certificates: Annotated[list[str], NoDecode] = []
    require_kos_reference: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    dicom_tls: bool = False
    audit_max_bytes: int = Field(64 << 20, gt=0)
    audit_backups: int = Field(10, ge=1)
    audit_syslog: str = ""
    audit_syslog_transport: Literal["udp", "tls"] = "udp"
    audit_syslog_ca_file: str = ""

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _split_aets(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in re.split(r"[,\s]+", value) if part]
        if isinstance(value, list):
            return [_ae_title(str(part)) for part in value]
        return value

    @field_validator("gateway_oid", "patient_id_issuer_oid", "accession_issuer_oid",
                     "order_issuer_oid")
    @classmethod
    def _check_oid(cls, value: str) -> str:
        value = value.strip().removeprefix("urn:oid:")
        if value and (len(value) > 64 or not _OID.fullmatch(value)):
            raise ValueError(f"{value!r} is not an OID (digits and dots, e.g. 1.2.250.1.999)")
        return value

    @field_validator("organization_finess")
    @classmethod
    def _check_finess(cls, value: str) -> str:
        value = value.strip()
        if value and not re.fullmatch(r"[0-9]{2}[0-9AB][0-9]{6}", value):
            raise ValueError(f"{value!r} is not a FINESS number (9 characters, e.g. 750712184)")
        return value

    @field_validator("cors_allow_origins", "masking_codes", "auth_allowed_subjects",
                     mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in re.split(r"[,\s]+", value) if part]
        return value

    @field_validator("auth_client_certificates", mode="before")
    @classmethod
    def _check_certificates(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for entry in value if isinstance(value, list) else ():
            name, _, scopes = str(entry).partition("=")
            if not name.strip() or not scopes.split():
                raise ValueError(f"{entry!r}: expected CERTIFICATE NAME=scope [scope...]")
        return value

    def check_http_exposure(self) -> None:
        """Raise ValueError when HTTP would serve other machines without authentication
        (the demo mode is for loopback only, unless ``allow_unauthenticated``)."""
        if not (self.auth_issuer or self.auth_client_certificates or self.allow_unauthenticated
                or _is_loopback(self.http_host)):
            raise ValueError(
                f"http_host {self.http_host} is reachable from other machines but no "
                "authentication is configured: set auth_issuer (OAuth2 tokens) or "
                "auth_client_certificates, or allow_unauthenticated = true to let anyone "
                "who can connect read the images")

    def certificate_scopes(self) -> dict[str, frozenset[str]]:
        """Client certificate common name -> the scopes it grants."""
        return {name.strip(): frozenset(scopes.split()) for name, _, scopes in
                (entry.partition("=") for entry in self.auth_client_certificates)}

    @field_validator("audit_syslog")
    @classmethod
    def _check_syslog(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if value and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"audit_syslog must be host:port, not {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("log_level must be DEBUG, INFO, WARNING or ERROR")
        return value

    @model_validator(mode="after")
    def _default_public_url(self) -> "Settings":
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if bool(self.registry_client_cert_file) != bool(self.registry_client_key_file):
            raise ValueError("registry_client_cert_file and registry_client_key_file go "
                             "together")
        if self.auth_client_certificates and not self.tls_client_ca_file:
            raise ValueError("auth_client_certificates needs tls_client_ca_file (mutual TLS)")
        if self.dicom_tls and not self.tls_cert_file:
            raise ValueError("dicom_tls needs tls_cert_file and tls_key_file")
        if not self.public_url:
            scheme = "https" if self.tls_cert_file else "http"
            self.public_url = f"{scheme}://{self.http_host}:{self.http_port}"
        self.public_url = self.public_url.rstrip("/")
        Confidentiality(self.confidentiality, tuple(self.masking_codes))  # ValueError if bad
        if self.auth_issuer and not (self.auth_jwks_url and self.auth_audience):
            raise ValueError("auth_issuer is set: auth_jwks_url and auth_audience are required")
        if not self.gateway_oid:
            # Stable for a given public URL; a real deployment sets its registered OID.
            digest = hashlib.sha256(f"passerelle-gateway\n{self.public_url}".encode()).digest()
            self.gateway_oid = uid_from_digest(digest)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order of precedence: explicit arguments, environment, config file, defaults."""
        config_file = os.environ.get("PASSERELLE_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def load_settings(config_file: Path | None = None) -> Settings:
    """Settings from the environment and ``config_file`` (or ``PASSERELLE_CONFIG``)."""
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        os.environ["PASSERELLE_CONFIG"] = str(config_file)
    return Settings()
