"""``passerelle serve``: the DICOM SCP and the HTTP server in one process."""

import logging
import signal
import ssl
from pathlib import Path
from types import FrameType

import uvicorn

from gateway import metrics
from gateway.config import Settings
from gateway.dicom.scp import DicomService
from gateway.metrics import watch_outbox
from gateway.publication.event_codes import load_event_codes
from gateway.publication.publisher import Publisher
from gateway.publication.registry_client import RegistryClient
from gateway.publication.stable import StableStudyWatcher
from gateway.security.audit import AuditTrail
from gateway.security.syslog_export import TlsSyslog, UdpSyslog
from gateway.security.tls import client_context, server_context
from gateway.web.app import create_app
from gateway.web.http.protocol import guarded_protocol
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


def _registry_tls(settings: Settings) -> ssl.SSLContext | None:
    """The client context towards the registry, when a CA or a certificate is configured."""
    if not (settings.registry_ca_file or settings.registry_client_cert_file):
        return None
    return client_context(_optional_path(settings.registry_ca_file),
                          _optional_path(settings.registry_client_cert_file),
                          _optional_path(settings.registry_client_key_file))


def _audit_syslog(settings: Settings) -> UdpSyslog | TlsSyslog | None:
    """Where audit messages are copied. Over TLS the gateway shows its own certificate,
    when it has one: ATNA secure nodes authenticate each other (IHE ITI-19)."""
    if not settings.audit_syslog:
        return None
    host, _, port = settings.audit_syslog.rpartition(":")
    if settings.audit_syslog_transport == "udp":
        return UdpSyslog((host, int(port)))
    return TlsSyslog((host, int(port)), client_context(
        _optional_path(settings.audit_syslog_ca_file), _optional_path(settings.tls_cert_file),
        _optional_path(settings.tls_key_file)))


def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then stop HTTP, then DICOM, cleanly."""
    # uvicorn handles the signal while it runs and raises it again once HTTP has drained;
    # these handlers turn that into an exception so the DICOM side is stopped below instead
    # of the process dying on the default SIGTERM action.
    settings.check_http_exposure()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _request_shutdown)
    event_codes = load_event_codes(_optional_path(settings.event_codes_file))
    tls = server_context(Path(settings.tls_cert_file), Path(settings.tls_key_file),
                         _optional_path(settings.tls_client_ca_file)
                         ) if settings.tls_cert_file else None
    registry_tls = _registry_tls(settings)
    syslog = _audit_syslog(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock = ServiceLock(settings.data_dir)
    lock.acquire()
    store = Store(settings.data_dir, settings.duplicate_policy)
    # Only the lock holder may purge: an import running beside the service has its own
    # temporary files in flight.
    removed = store.blobs.purge_temporary()
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted write", removed)
    if not lock.previous_stop_was_clean:
        log.warning("previous run did not stop cleanly: checking the index against the files")
        for kind, found in recover(store.blobs, store.index).counts().items():
            metrics.RECOVERY.labels(kind).set(found)
    audit = AuditTrail(settings.data_dir / "audit", settings.ae_title, store.index.patient_id_of,
                       settings.audit_max_bytes, settings.audit_backups, syslog)
    dicom = DicomService(settings, store, audit, tls if settings.dicom_tls else None)
    outbox = Outbox(store.index)
    watch_outbox(outbox)
    watcher = StableStudyWatcher(outbox, settings.stable_seconds)
    publisher = None
    if settings.registry_url:
        publisher = Publisher(store, settings,
                              RegistryClient(settings.registry_url, settings.registry_timeout,
                                             registry_tls),
                              event_codes, audit)
    else:
        log.warning("registry_url is not set: manifests are queued, not sent")
    try:
        dicom.start()
        watcher.start()
        if publisher is not None:
            publisher.start()
        app = create_app(store, settings, dicom.is_serving, audit,
                         publisher.wake if publisher is not None else lambda: None)
        config = uvicorn.Config(
            app, host=settings.http_host, port=settings.http_port, log_config=None,
            access_log=False, server_header=False, lifespan="off",
            limit_concurrency=settings.http_max_connections,
            timeout_keep_alive=settings.http_keep_alive_seconds,
            ssl_certfile=settings.tls_cert_file or None, ssl_keyfile=settings.tls_key_file or None,
            http=guarded_protocol(settings.http_head_timeout_seconds,
                                  settings.http_max_connections_per_client))
        config.load()
        config.ssl = tls  # ours: TLS >= 1.2 and client certificates, which uvicorn's lacks
        uvicorn.Server(config).run()
    except ShutdownRequestedError as exc:
        log.info("%s received", exc)
    finally:
        log.info("shutting down the DICOM SCP")
        dicom.stop()
        watcher.stop()
        if publisher is not None:
            publisher.stop()
        audit.close()
        store.close()
        lock.release()
        log.info("stopped")
