"""``passerelle serve``: the DICOM SCP and the HTTP server in one process."""

import contextlib
import logging
import signal
import ssl
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from gateway import metrics
from gateway.config import (
    AuditSettings,
    PublicationSettings,
    Settings,
    TlsSettings,
)
from gateway.control import ControlChannel
from gateway.dicom.scp import DicomService
from gateway.imaging.budget import ResourceBudget
from gateway.imaging.deidentify import load_or_create_key
from gateway.imaging.render_cache import RenderCache
from gateway.metrics import watch_outbox
from gateway.publication.event_codes import load_event_codes
from gateway.publication.kos import RetrieveOrigin
from gateway.publication.publisher import Publisher
from gateway.publication.registry_client import RegistryClient
from gateway.publication.stable import StableStudyWatcher
from gateway.security.audit import AuditTrail
from gateway.security.syslog_export import TlsSyslog, UdpSyslog
from gateway.security.tls import client_context, server_context
from gateway.web.app import create_app
from gateway.web.http.protocol import MAX_HEAD_BYTES, guarded_protocol
from gateway.web.services import Services
from storage.database import database_url, dialect_of, masked
from storage.outbox import Outbox
from storage.recovery import ServiceLock, recover
from storage.store import Store

log = logging.getLogger(__name__)


class ShutdownRequestedError(Exception):
    """SIGTERM or SIGINT was received."""


def _request_shutdown(signum: int, frame: FrameType | None) -> None:
    raise ShutdownRequestedError(signal.Signals(signum).name)


def _optional_path(name: str) -> Path | None:
    return Path(name) if name else None


def _registry_tls(publication: PublicationSettings) -> ssl.SSLContext | None:
    """The client context towards the registry, when a CA or a certificate is configured."""
    if not (publication.registry_ca_file or publication.registry_client_cert_file):
        return None
    return client_context(_optional_path(publication.registry_ca_file),
                          _optional_path(publication.registry_client_cert_file),
                          _optional_path(publication.registry_client_key_file))


def _audit_syslog(audit: AuditSettings, tls: TlsSettings) -> UdpSyslog | TlsSyslog | None:
    """Where audit messages are copied. Over TLS the gateway shows its own certificate,
    when it has one: ATNA secure nodes authenticate each other (IHE ITI-19)."""
    if not audit.syslog:
        return None
    host, _, port = audit.syslog.rpartition(":")
    if audit.syslog_transport == "udp":
        return UdpSyslog((host, int(port)))
    return TlsSyslog((host, int(port)), client_context(
        _optional_path(audit.syslog_ca_file), _optional_path(tls.cert_file),
        _optional_path(tls.key_file)))


def resource_budget(settings: Settings, store: Store) -> ResourceBudget:
    """The process's one resource budget, shared by HTTP and DICOM (and by ``store``, which
    compares a re-sent instance with the stored one within its decode memory)."""
    budget = ResourceBudget(**settings.budget.model_dump(), scratch=store.blobs.scratch)
    store.decode_memory = budget.memory
    return budget


def http_services(settings: Settings, store: Store, audit: AuditTrail,
                  dicom_serving: Callable[[], bool],
                  wake_publisher: Callable[[], None] = lambda: None,
                  budget: ResourceBudget | None = None) -> Services:
    """What the HTTP side works with, over ``store`` and the data dir of ``settings``."""
    return Services(
        store=store, outbox=Outbox(store.index), audit=audit,
        render_cache=RenderCache(settings.data_dir / "cache" / "rendered",
                                 settings.imaging.render_cache_bytes),
        budget=budget or resource_budget(settings, store),
        deidentify_key=load_or_create_key(settings.data_dir),
        public_url=settings.http.public_url,
        max_instance_bytes=settings.ingest.max_instance_bytes,
        body_timeout_seconds=settings.http.body_timeout_seconds,
        dicom_serving=dicom_serving, wake_publisher=wake_publisher,
        registry_url=settings.publication.registry_url)


def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then stop HTTP, then DICOM, cleanly."""
    # uvicorn handles the signal while it runs and raises it again once HTTP has drained;
    # these handlers turn that into an exception so the DICOM side is stopped below instead
    # of the process dying on the default SIGTERM action.
    settings.check_http_exposure()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _request_shutdown)
    publication = settings.publication
    event_codes = load_event_codes(_optional_path(publication.event_codes_file))
    tls = server_context(Path(settings.tls.cert_file), Path(settings.tls.key_file),
                         _optional_path(settings.tls.client_ca_file)
                         ) if settings.tls.cert_file else None
    registry_tls = _registry_tls(publication)
    syslog = _audit_syslog(settings.audit, settings.tls)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Replicas (an index on PostgreSQL) share the data dir; a service on SQLite has it alone.
    replica = dialect_of(database_url(settings.database_url, settings.data_dir)) == "postgresql"
    lock = ServiceLock(settings.data_dir, replica)
    lock.acquire()
    # Each step of the stop runs even if an earlier one fails (last registered, first run).
    with contextlib.ExitStack() as stop:
        stop.callback(log.info, "stopped")
        stop.callback(lock.release)
        store = Store(settings.data_dir, settings.ingest.duplicate_policy, settings.ingest.limits(),
                      database_url=settings.database_url)
        stop.callback(store.close)
        log.info("index database: %s", masked(store.index.database.url))
        removed = lock.purge_temporary(store.blobs)
        if removed:
            log.warning("removed %d temporary file(s) left by an interrupted write", removed)
        if not lock.previous_stop_was_clean:
            log.warning("previous run did not stop cleanly: checking the index against the files")
            for kind, found in recover(store.blobs, store.index).counts().items():
                metrics.RECOVERY.labels(kind).set(found)
        audit = AuditTrail(settings.data_dir / "audit", settings.dicom.ae_title,
                           store.index.patient_id_of, settings.audit, syslog)
        stop.callback(audit.close)
        budget = resource_budget(settings, store)
        dicom = DicomService(settings.dicom, store, audit, budget.ingest,
                             tls if settings.dicom.tls else None)
        outbox = Outbox(store.index)
        watch_outbox(outbox)
        watcher = StableStudyWatcher(outbox, publication.stable_seconds)
        publisher = None
        if publication.registry_url:
            origin = RetrieveOrigin(settings.http.public_url, settings.producer.gateway_oid,
                                    settings.producer.organization_name)
            publisher = Publisher(store, RegistryClient(publication.registry_url,
                                                        publication.registry_timeout, registry_tls),
                                  event_codes, audit, settings.producer, origin, publication)
            stop.callback(publisher.stop)
        else:
            log.warning("registry_url is not set: manifests are queued, not sent")
        stop.callback(watcher.stop)
        stop.callback(dicom.stop)
        stop.callback(log.info, "shutting down the DICOM SCP")
        http = settings.http
        control = ControlChannel(settings.data_dir, replica)
        stop.callback(control.close)
        try:
            control.open()
            dicom.start()
            watcher.start()
            if publisher is not None:
                publisher.start()
            services = http_services(settings, store, audit, dicom.is_serving,
                                     publisher.wake if publisher is not None else lambda: None,
                                     budget)
            app = create_app(services, http, settings.auth)
            config = uvicorn.Config(
                app, host=http.host, port=http.port, log_config=None,
                access_log=False, server_header=False, lifespan="off",
                limit_concurrency=http.max_connections,
                timeout_keep_alive=http.keep_alive_seconds,
                h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                ssl_certfile=settings.tls.cert_file or None,
                ssl_keyfile=settings.tls.key_file or None,
                http=guarded_protocol(http.head_timeout_seconds, http.max_connections_per_client))
            config.load()
            config.ssl = tls  # ours: TLS >= 1.2 and client certificates, which uvicorn's lacks
            control.serve_beside(uvicorn.Server(config), services)
        except ShutdownRequestedError as exc:
            log.info("%s received", exc)
