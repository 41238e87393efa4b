"""Settings: code defaults < config file (TOML) < ``PASSERELLE_*`` environment variables.

Settings come in sections, one per component (``dicom``, ``http``, ``ingest``, ``imaging``,
``budget``, ``publication``, ``pacs``, ``producer``, ``auth``, ``tls``, ``audit``), and each
component is given its own section. Every setting also has one flat name, the one documented
since the start: ``PASSERELLE_<FLAT NAME>`` sets it from the environment
(``PASSERELLE_DICOM_PORT``), and a config file or a caller may use it instead of the section
form.
``config/passerelle.toml`` documents every key with its default. The file is optional: it is
read from ``--config`` or ``PASSERELLE_CONFIG`` when given.
"""

import hashlib
import ipaddress
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.dicom.peer import AE_TITLE, DicomPeer, parse_peer
from gateway.publication.confidentiality import Confidentiality
from storage.database import check_database_url, database_url, dialect_of
from storage.store import DuplicatePolicy
from storage.structure import IngestLimits
from storage.uids import oid_of, uid_from_digest

ENV_PREFIX = "PASSERELLE_"
# The file given to load_settings (``--config``), read instead of PASSERELLE_CONFIG.
_CONFIG_FILE: ContextVar[str | None] = ContextVar("config_file", default=None)



def _ae_title(value: str) -> str:
    value = value.strip()
    if not AE_TITLE.fullmatch(value):
        raise ValueError(f"invalid AE title {value!r}: 1 to 16 printable ASCII characters")
    return value


def _words(value: object) -> object:
    """A list given as one string (environment form): split on commas and white space."""
    if isinstance(value, str):
        return [part for part in re.split(r"[,\s]+", value) if part]
    return value


def _oid(value: str) -> str:
    oid = oid_of(value)
    if value.strip() and not oid:
        raise ValueError(f"{value!r} is not an OID (digits and dots, e.g. 1.2.250.1.999)")
    return oid


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Section(BaseModel):
    """A group of settings; a field's alias, where it has one, is its flat name."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)


class DicomSettings(_Section):
    """The DICOM listener (DIMSE)."""

    ae_title: str = "PASSERELLE"
    host: str = Field("127.0.0.1", alias="dicom_host")
    port: int = Field(11112, ge=0, le=65535, alias="dicom_port")
    tls: bool = Field(False, alias="dicom_tls")
    allowed_calling_aets: list[str] = []
    max_pdu: int = Field(262144, ge=0)
    max_associations: int = Field(16, ge=1)
    max_associations_per_client: int = Field(8, ge=1)
    max_pending_connections: int = Field(128, ge=1)
    artim_timeout: float = Field(10, gt=0)
    acse_timeout: float = Field(30, gt=0)
    dimse_timeout: float = Field(60, gt=0)
    network_timeout: float = Field(120, gt=0)
    shutdown_grace_seconds: float = Field(10, ge=0)
    # Matches one C-FIND answers at most (as QIDO-RS's maxResults); past them it fails with
    # A700 (out of resources) after the first ones.
    max_find_matches: int = Field(10000, ge=1)
    # Processes receiving associations on the one port (gateway.supervisor); 0: one per CPU.
    receivers: int = Field(0, ge=0, le=64, alias="dicom_receivers")
    # The receivers' nice increment: storing yields the CPU to the HTTP requests a person
    # waits on when both want it, and takes all of it when they do not.
    nice: int = Field(10, ge=0, le=19, alias="dicom_nice")

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _split_aets(cls, value: object) -> object:
        value = _words(value)
        return [_ae_title(str(part)) for part in value] if isinstance(value, list) else value

    def receiver_count(self) -> int:
        """How many DICOM receiver processes to run: ``receivers``, or the CPU count when 0."""
        return self.receivers or os.cpu_count() or 1

    @property
    def serves_query_retrieve(self) -> bool:
        """Whether C-FIND, C-GET and C-MOVE are offered: they give every patient's data to
        whoever asks, so beyond loopback only with a calling-AE allowlist or over TLS."""
        return bool(self.allowed_calling_aets) or self.tls or _is_loopback(self.host)


class HttpSettings(_Section):
    """The HTTP listener and its limits."""

    host: str = Field("127.0.0.1", alias="http_host")
    port: int = Field(8080, ge=0, le=65535, alias="http_port")
    public_url: str = ""  # empty: derived from host, port and TLS (Settings)
    cors_allow_origins: list[str] = []
    # Host names served without authentication besides this machine's and public_url's
    # (gateway.web.middleware.allowed_hosts), e.g. the name a reverse proxy forwards.
    allowed_hosts: list[str] = Field([], alias="http_allowed_hosts")
    max_requests_per_client: int = Field(64, ge=1, alias="http_max_requests_per_client")
    max_connections: int = Field(1024, ge=1, alias="http_max_connections")
    max_connections_per_client: int = Field(128, ge=1, alias="http_max_connections_per_client")
    head_timeout_seconds: float = Field(10, gt=0, alias="http_head_timeout_seconds")
    body_timeout_seconds: float = Field(60, gt=0, alias="http_body_timeout_seconds")
    keep_alive_seconds: float = Field(30, gt=0, alias="http_keep_alive_seconds")
    # Processes serving HTTP, each its own interpreter (gateway.supervisor); 0: one per CPU.
    workers: int = Field(0, ge=0, le=256, alias="http_workers")
    # Where `passerelle install-viewer` put OHIF, served at /viewer/ (relative: to the
    # working directory, like data_dir).
    viewer_dir: Path = Field(Path("viewer"), alias="viewer_dir")

    _split = field_validator("cors_allow_origins", "allowed_hosts", mode="before")(_words)

    def worker_count(self) -> int:
        """How many HTTP worker processes to run: ``workers``, or the CPU count when 0."""
        return self.workers or os.cpu_count() or 1


class IngestSettings(_Section):
    """What every way in (C-STORE, STOW-RS, import) does with what it receives."""

    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    max_instance_bytes: int = Field(1 << 30, gt=0)
    max_sequence_items: int = Field(50_000, ge=1)
    # Each level costs a few stack frames in every reader: well under Python's 1000.
    max_sequence_depth: int = Field(32, ge=1, le=100)
    max_dataset_elements: int = Field(1_000_000, ge=1)

    def limits(self) -> IngestLimits:
        """The limits every way in applies to an instance."""
        return IngestLimits(self.max_instance_bytes, self.max_sequence_items,
                            self.max_sequence_depth, self.max_dataset_elements)


class ImagingSettings(_Section):
    """Rendering."""

    render_cache_bytes: int = Field(512 << 20, ge=0)


class BudgetSettings(_Section):
    """What one request, and the whole process, may hold at once (gateway.imaging.budget)."""

    decode_workers: int = Field(2, ge=1)
    decode_memory_bytes: int = Field(512 << 20, gt=0)
    decode_wait_seconds: float = Field(5, ge=0)
    max_output_pixels: int = Field(4096 * 4096, gt=0)
    # Temporary disk bytes of the receptions in progress (STOW-RS and C-STORE).
    ingest_bytes_in_flight: int = Field(4 << 30, gt=0)
    max_parts_per_request: int = Field(10000, ge=1)
    part_overhead_bytes: int = Field(4096, ge=0)
    # Bytes a reception must bring in each minute to keep its ingest bytes (0: no floor).
    reception_min_bytes_per_minute: int = Field(1 << 20, ge=0)


class PublicationSettings(_Section):
    """When and how manifests reach the document registry."""

    registry_url: str = ""
    stable_seconds: float = Field(60, gt=0)
    registry_timeout: float = Field(30, gt=0)
    registry_ca_file: str = ""
    registry_client_cert_file: str = ""
    registry_client_key_file: str = ""
    publish_retry_seconds: float = Field(10, gt=0)
    publish_retry_max_seconds: float = Field(3600, gt=0)
    event_codes_file: str = ""
    lease_seconds: float = Field(60, gt=0)

    @model_validator(mode="after")
    def _check_pairs(self) -> "PublicationSettings":
        if bool(self.registry_client_cert_file) != bool(self.registry_client_key_file):
            raise ValueError("registry_client_cert_file and registry_client_key_file go "
                             "together")
        return self


class PacsSettings(_Section):
    """The PACS peers studies are fetched from and given back by, where C-MOVE may send, and
    when local copies of what a PACS holds may go."""

    # Peers as AE@host:port[/move|/get]; the first is asked first.
    peers: list[DicomPeer] = Field([], alias="pacs")
    # The only AEs a C-MOVE request to us may name as its destination.
    move_destinations: list[DicomPeer] = []
    # Seconds to wait for a PACS to answer one DIMSE request (C-FIND, C-MOVE, C-GET).
    pacs_timeout: float = Field(60, gt=0)
    # Remove the local copy of a study nobody read for this many days (when a PACS is
    # confirmed to hold all of it); 0: never by age.
    retention_days: float = Field(0, ge=0)
    # Remove such copies, least recently read first, while the data dir's disk is fuller
    # than this percentage.
    retention_high_water_percent: float = Field(90, gt=0, le=100)
    # Seconds between two passes of the retention policy in the background worker.
    retention_interval_seconds: float = Field(3600, gt=0)
    # How long an HTTP or DIMSE client waits for a study retrieved on demand before a 503.
    retrieve_wait_seconds: float = Field(30, gt=0)

    @field_validator("peers", "move_destinations", mode="before")
    @classmethod
    def _parse_peers(cls, value: object) -> object:
        value = _words(value)
        if isinstance(value, list):
            return [parse_peer(part) if isinstance(part, str) else part for part in value]
        return value


class ProducerSettings(_Section):
    """Who publishes: the institution-level metadata of every manifest."""

    gateway_oid: str = ""  # empty: derived from the public URL (Settings)
    organization_name: str = "Service d'imagerie"
    organization_finess: str = ""
    patient_id_issuer_oid: str = ""
    accession_issuer_oid: str = ""
    order_issuer_oid: str = ""
    facility_type: str = "SA01"
    practice_setting: str = "ETABLISSEMENT"
    designation_type: str = "07"
    confidentiality: str = "N"
    masking_codes: list[str] = []
    authenticator_idnps: str = ""
    authenticator_name: str = ""

    _check_oids = field_validator("gateway_oid", "patient_id_issuer_oid",
                                  "accession_issuer_oid", "order_issuer_oid")(_oid)
    _split = field_validator("masking_codes", mode="before")(_words)

    @field_validator("organization_finess")
    @classmethod
    def _check_finess(cls, value: str) -> str:
        value = value.strip()
        if value and not re.fullmatch(r"[0-9]{2}[0-9AB][0-9]{6}", value):
            raise ValueError(f"{value!r} is not a FINESS number (9 characters, e.g. 750712184)")
        return value

    @model_validator(mode="after")
    def _check_confidentiality(self) -> "ProducerSettings":
        self.default_confidentiality()  # ValueError if bad
        return self

    def default_confidentiality(self) -> Confidentiality:
        """The confidentiality of a manifest nobody changed."""
        return Confidentiality(self.confidentiality, tuple(self.masking_codes))


class AuthSettings(_Section):
    """Who may use the HTTP API, and with which rights."""

    issuer: str = Field("", alias="auth_issuer")
    jwks_url: str = Field("", alias="auth_jwks_url")
    audience: str = Field("", alias="auth_audience")
    read_scope: str = Field("dicomweb.read", alias="auth_read_scope")
    write_scope: str = Field("dicomweb.write", alias="auth_write_scope")
    admin_scope: str = Field("passerelle.admin", alias="auth_admin_scope")
    leeway_seconds: float = Field(30, ge=0, le=300, alias="auth_leeway_seconds")
    allowed_subjects: list[str] = Field([], alias="auth_allowed_subjects")
    client_certificates: list[str] = Field([], alias="auth_client_certificates")
    # Sign-in of the console and the viewer (OpenID Connect, authorization code + PKCE):
    # enabled by a client id; a confidential client also has a secret.
    client_id: str = Field("", alias="auth_client_id")
    client_secret: str = Field("", alias="auth_client_secret", repr=False)
    discovery_url: str = Field("", alias="auth_discovery_url")  # "": {issuer}/.well-known/...
    session_max_age_seconds: float = Field(8 * 3600, ge=60, le=24 * 3600,
                                           alias="auth_session_max_age_seconds")
    # "": a random key made once in the data dir (gateway.web.middleware.session).
    session_secret: str = Field("", alias="auth_session_secret", repr=False)
    metrics_require_auth: bool = False
    allow_unauthenticated: bool = False
    require_kos_reference: bool = False

    _split = field_validator("allowed_subjects", mode="before")(_words)

    @field_validator("client_certificates", mode="before")
    @classmethod
    def _check_certificates(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for entry in value if isinstance(value, list) else ():
            name, _, scopes = str(entry).partition("=")
            if not name.strip() or not scopes.split():
                raise ValueError(f"{entry!r}: expected CERTIFICATE NAME=scope [scope...]")
        return value

    @model_validator(mode="after")
    def _check_issuer(self) -> "AuthSettings":
        if self.issuer and not (self.jwks_url and self.audience):
            raise ValueError("auth_issuer is set: auth_jwks_url and auth_audience are required")
        if self.client_id and not self.issuer:
            raise ValueError("auth_client_id (sign-in) needs auth_issuer")
        if self.session_secret and len(self.session_secret) < 32:
            raise ValueError("auth_session_secret must be at least 32 characters")
        if self.issuer and not self.discovery_url:
            self.discovery_url = \
                f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"
        return self

    @property
    def sign_in(self) -> bool:
        """True when browsers sign in (OpenID Connect) to the console and the viewer."""
        return bool(self.client_id)

    @property
    def enabled(self) -> bool:
        """True when requests must prove who they are (token or client certificate)."""
        return bool(self.issuer or self.client_certificates)

    def certificate_scopes(self) -> dict[str, frozenset[str]]:
        """Client certificate common name -> the scopes it grants."""
        return {name.strip(): frozenset(scopes.split()) for name, _, scopes in
                (entry.partition("=") for entry in self.client_certificates)}


class TlsSettings(_Section):
    """The service's certificate (HTTPS, DICOM TLS, syslog TLS) and the client CA."""

    cert_file: str = Field("", alias="tls_cert_file")
    key_file: str = Field("", alias="tls_key_file")
    client_ca_file: str = Field("", alias="tls_client_ca_file")

    @model_validator(mode="after")
    def _check_pair(self) -> "TlsSettings":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


class AuditSettings(_Section):
    """The audit trail and its copy to a syslog collector."""

    max_bytes: int = Field(64 << 20, gt=0, alias="audit_max_bytes")
    backups: int = Field(10, ge=1, alias="audit_backups")
    max_age_days: int = Field(365, ge=1, alias="audit_max_age_days")
    failure_period_seconds: float = Field(300, gt=0, alias="audit_failure_period_seconds")
    failure_clients: int = Field(256, ge=1, alias="audit_failure_clients")
    syslog: str = Field("", alias="audit_syslog")
    syslog_transport: Literal["udp", "tls"] = Field("udp", alias="audit_syslog_transport")
    syslog_ca_file: str = Field("", alias="audit_syslog_ca_file")

    @field_validator("syslog")
    @classmethod
    def _check_syslog(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if value and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"audit_syslog must be host:port, not {value!r}")
        return value


_SECTIONS: dict[str, type[_Section]] = {
    "dicom": DicomSettings, "http": HttpSettings, "ingest": IngestSettings,
    "imaging": ImagingSettings, "budget": BudgetSettings,
    "publication": PublicationSettings, "pacs": PacsSettings,
    "producer": ProducerSettings, "auth": AuthSettings, "tls": TlsSettings,
    "audit": AuditSettings,
}
_TOP_LEVEL = ("data_dir", "database_url", "log_level")
# flat name -> (section, field)
FLAT_NAMES: dict[str, tuple[str, str]] = {
    (info.alias or name): (section, name)
    for section, model in _SECTIONS.items() for name, info in model.model_fields.items()}


def _sectioned(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every flat key moved into its section, under its field name; unknown
    keys are left where they are, for validation to refuse by name. ValueError when one
    source gives a setting twice (flat and in its section)."""
    result: dict[str, Any] = {}

    def place(section: str, field: str, value: Any) -> None:
        fields = result.setdefault(section, {})
        if field in fields:
            flat = next(name for name, place in FLAT_NAMES.items() if place == (section, field))
            raise ValueError(f"{flat} is given twice: as {flat} and as [{section}] {field}")
        fields[field] = value

    for key, value in values.items():
        if key in _SECTIONS and isinstance(value, dict):
            aliases = {info.alias: name for name, info in _SECTIONS[key].model_fields.items()
                       if info.alias}
            for name, item in value.items():
                place(key, aliases.get(name, name), item)
        elif key in FLAT_NAMES:
            place(*FLAT_NAMES[key], value)
        else:
            result[key] = value
    return result


class _SectionedSource(PydanticBaseSettingsSource):
    """Another source's values in the sectioned form, so that sources merge per field."""

    def __init__(self, settings_cls: type[BaseSettings],
                 source: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.source = source

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        """Unused: ``__call__`` answers for the whole model."""
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        return _sectioned(self.source())


class _FlatEnvironment(PydanticBaseSettingsSource):
    """``PASSERELLE_<FLAT NAME>`` variables (any case), as raw strings: each field's own
    validator parses them (lists are comma or space separated)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        """Unused: ``__call__`` answers for the whole model."""
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        environment = {name.upper(): value for name, value in os.environ.items()}
        return _sectioned({name: environment[f"{ENV_PREFIX}{name.upper()}"]
                           for name in (*_TOP_LEVEL, *FLAT_NAMES)
                           if f"{ENV_PREFIX}{name.upper()}" in environment})


class Settings(BaseSettings):
    """Every setting of the service, by section."""

    model_config = SettingsConfigDict(extra="forbid")
    sections: ClassVar[dict[str, type[_Section]]] = _SECTIONS

    data_dir: Path = Path("data")
    # The index's database: "" for the SQLite file of the data dir, or postgresql://...
    database_url: str = ""
    log_level: str = "INFO"
    dicom: DicomSettings = DicomSettings()
    http: HttpSettings = HttpSettings()
    ingest: IngestSettings = IngestSettings()
    imaging: ImagingSettings = ImagingSettings()
    budget: BudgetSettings = BudgetSettings()
    publication: PublicationSettings = PublicationSettings()
    pacs: PacsSettings = PacsSettings()
    producer: ProducerSettings = ProducerSettings()
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    audit: AuditSettings = AuditSettings()

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        value = value.strip()
        if value:
            check_database_url(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("log_level must be DEBUG, INFO, WARNING or ERROR")
        return value

    @model_validator(mode="after")
    def _across_sections(self) -> "Settings":
        if self.auth.client_certificates and not self.tls.client_ca_file:
            raise ValueError("auth_client_certificates needs tls_client_ca_file (mutual TLS)")
        if self.dicom.tls and not self.tls.cert_file:
            raise ValueError("dicom_tls needs tls_cert_file and tls_key_file")
        if not self.http.public_url:
            scheme = "https" if self.tls.cert_file else "http"
            self.http.public_url = f"{scheme}://{self.http.host}:{self.http.port}"
        self.http.public_url = self.http.public_url.rstrip("/")
        public = urlsplit(self.http.public_url)
        if self.auth.sign_in and public.scheme != "https" \
                and not _is_loopback(public.hostname or ""):
            # The session cookie is Secure: browsers keep it over https, or on loopback.
            raise ValueError("auth_client_id (sign-in) needs an https public_url")
        if not self.producer.gateway_oid:
            # Stable for a given public URL; a real deployment sets its registered OID.
            digest = hashlib.sha256(
                f"passerelle-gateway\n{self.http.public_url}".encode()).digest()
            self.producer.gateway_oid = uid_from_digest(digest)
        return self

    def is_replica(self) -> bool:
        """True when the index is on PostgreSQL: replicas may share the data dir (a service
        on SQLite has it alone)."""
        return dialect_of(database_url(self.database_url, self.data_dir)) == "postgresql"

    def check_http_exposure(self) -> None:
        """Raise ValueError when HTTP would serve other machines without authentication
        (the demo mode is for loopback only, unless ``allow_unauthenticated``)."""
        if not (self.auth.enabled or self.auth.allow_unauthenticated
                or _is_loopback(self.http.host)):
            raise ValueError(
                f"http_host {self.http.host} is reachable from other machines but no "
                "authentication is configured: set auth_issuer (OAuth2 tokens) or "
                "auth_client_certificates, or allow_unauthenticated = true to let anyone "
                "who can connect read the images")

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
        sources: list[PydanticBaseSettingsSource] = [
            _SectionedSource(settings_cls, init_settings), _FlatEnvironment(settings_cls)]
        config_file = _CONFIG_FILE.get() or os.environ.get(f"{ENV_PREFIX}CONFIG")
        if config_file:
            sources.append(_SectionedSource(settings_cls, TomlConfigSettingsSource(
                settings_cls, toml_file=Path(config_file))))
        return tuple(sources)


def describe(error: ValidationError) -> str:
    """The problems of a ValidationError, one line each, naming each setting by its flat
    name and environment variable (``dicom_port (PASSERELLE_DICOM_PORT): ...``)."""
    names = {place: flat for flat, place in FLAT_NAMES.items()}
    names |= {(name,): name for name in _TOP_LEVEL}
    lines = []
    for problem in error.errors():
        place = tuple(str(part) for part in problem["loc"])
        flat = names.get(place[:2]) or names.get(place[:1])
        # else a rule across settings, or an unknown key
        where = f"{flat} ({ENV_PREFIX}{flat.upper()})" if flat else ".".join(place) or "settings"
        lines.append(f"{where}: {problem['msg']}")
    return "\n".join(lines)


def load_settings(config_file: Path | None = None) -> Settings:
    """Settings from the environment and ``config_file`` (else ``PASSERELLE_CONFIG``);
    FileNotFoundError when the file named either way does not exist."""
    named = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG")
    if named and not Path(named).is_file():
        raise FileNotFoundError(f"config file not found: {named}")
    token = _CONFIG_FILE.set(str(named) if named else None)
    try:
        return Settings()
    finally:
        _CONFIG_FILE.reset(token)
