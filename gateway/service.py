"""The composition of each process of ``passerelle serve`` (started by gateway.supervisor):
a DICOM receiver, an HTTP worker, the background worker (stable studies, publisher,
control channel). Each opens its own index and audit trail on the data dir and runs until
SIGTERM or SIGINT, then stops cleanly."""

import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType

import uvicorn
from prometheus_client import REGISTRY, CollectorRegistry

from gateway.config import (
    AuditSettings,
    PublicationSettings,
    Settings,
    TlsSettings,
)
from gateway.control import ControlChannel, TickingServer
from gateway.dicom.scp import DicomService
from gateway.dicom.slots import AssociationSlots
from gateway.imaging.budget import ResourceBudget
from gateway.imaging.deidentify import load_or_create_key
from gateway.imaging.render_cache import RenderCache
from gateway.liveness import BEAT_SECONDS, DICOM, ROLES, Board
from gateway.metrics import OutboxCollector, ServiceCollector, scrape_registry
from gateway.pacs import PacsConfig
from gateway.pacs.restore import Restorer
from gateway.pacs.retention import Retention, RetentionWorker
from gateway.publication.event_codes import load_event_codes
from gateway.publication.kos import RetrieveOrigin
from gateway.publication.publisher import Leases, Publisher
from gateway.publication.registry_client import RegistryClient
from gateway.publication.registry_probe import RegistryProbe
from gateway.publication.rejection import audit_rejections
from gateway.publication.stable import StableStudyWatcher
from gateway.security.audit import AuditTrail
from gateway.security.client_counts import ClientTable, SharedClientCounts
from gateway.security.syslog_export import TlsSyslog, UdpSyslog
from gateway.security.tls import client_context, server_context
from gateway.shared_tally import FileLock, SharedTally
from gateway.web.app import create_app
from gateway.web.http.protocol import MAX_HEAD_BYTES, guarded_protocol
from gateway.web.middleware.session import session_key
from gateway.web.services import Services
from storage.outbox import Outbox
from storage.store import Store
from storage.study_accesses import StudyAccesses

log = logging.getLogger(__name__)

# Counts every process holds against one capacity (gateway.shared_tally): the resource
# budget's, and the connections and associations of the DICOM receivers.
TALLIES = ("decode_memory", "ingest_bytes", "dicom_pending", "dicom_served")


class ShutdownRequestedError(Exception):
    """SIGTERM or SIGINT was received."""


def request_shutdown(signum: int, frame: FrameType | None) -> None:
    """Signal handler: SIGTERM and SIGINT become ShutdownRequestedError."""
    raise ShutdownRequestedError(signal.Signals(signum).name)


@dataclass(frozen=True)
class ProcessContext:
    """What the supervisor gives one of its processes."""

    settings: Settings
    slot: int  # its place on the board and in the budget tallies
    board: Board
    run_dir: Path  # the tallies of the shared budget
    recovery: dict[str, int] = field(default_factory=dict)  # found at start (metrics)
    listener: socket.socket | None = None  # DICOM and HTTP: the socket to accept on
    wake: Connection | None = None  # HTTP: write end; background: read end
    # HTTP workers: the connections and the requests in progress of each client address,
    # counted by every worker (a row each, at its slot), limited over all of them.
    connections: ClientTable | None = None
    requests: ClientTable | None = None
    associations: ClientTable | None = None  # DICOM: those of each client, the same way
    service: str = ""  # the name of this service (storage.recovery.ServiceLock)
    gone: tuple[str, ...] = ()  # a replica: the dead replicas whose locks it took over

    def beat(self) -> None:
        """Say on the board that this process serves."""
        self.board.beat(self.slot)


def tally_path(run_dir: Path, budget: str) -> Path:
    """The file of the tally of ``budget`` (one of TALLIES)."""
    return run_dir / f"{budget}.tally"


def _optional_path(name: str) -> Path | None:
    return Path(name) if name else None


def server_tls(settings: Settings) -> ssl.SSLContext | None:
    """The server context of HTTPS (and DICOM TLS), when a certificate is configured."""
    if not settings.tls.cert_file:
        return None
    return server_context(Path(settings.tls.cert_file), Path(settings.tls.key_file),
                          _optional_path(settings.tls.client_ca_file))


def registry_tls(publication: PublicationSettings) -> ssl.SSLContext | None:
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


def resource_budget(settings: Settings, store: Store,
                    context: ProcessContext | None = None) -> ResourceBudget:
    """The process's resource budget, shared by its HTTP and DICOM work (and by ``store``,
    which compares a re-sent instance with the stored one within its decode memory).

    Under the supervisor (``context``), the decode memory and the ingest bytes in flight
    are tallies shared with every other process: their settings bound the machine. The
    decode workers are threads of each process that decodes (HTTP workers).
    """
    def tally(name: str) -> SharedTally | None:
        return None if context is None else SharedTally(tally_path(context.run_dir, name),
                                                        context.slot)

    budget = ResourceBudget(**settings.budget.model_dump(), scratch=store.blobs.scratch,
                            memory_tally=tally("decode_memory"),
                            ingest_tally=tally("ingest_bytes"))
    store.decode_memory = budget.memory
    return budget


def open_store(settings: Settings) -> Store:
    """The store of ``settings``: files under the data dir, the index in its database."""
    return Store(settings.data_dir, settings.ingest.duplicate_policy, settings.ingest.limits(),
                 database_url=settings.database_url)


def audit_trail(settings: Settings, store: Store) -> AuditTrail:
    """The process's audit trail, which also audits the rejection notes ``store`` applies."""
    trail = AuditTrail(settings.data_dir / "audit", settings.dicom.ae_title,
                       store.index.patient_id_of, settings.audit,
                       _audit_syslog(settings.audit, settings.tls),
                       StudyAccesses(store.index).add)
    audit_rejections(store, trail)
    return trail


def retention_of(settings: Settings, store: Store, audit: AuditTrail) -> Retention:
    """The retention policy of ``settings`` over ``store``, auditing in ``audit``."""
    return Retention(settings.pacs, settings.dicom.ae_title,
                     settings.publication.stable_seconds, store, audit, settings.data_dir)


@contextlib.contextmanager
def standalone_retention(settings: Settings) -> Iterator[Retention]:
    """The retention of the data dir of ``settings`` for a command that no service
    answers: over a store and an audit trail of its own."""
    with contextlib.ExitStack() as stop:
        store = open_store(settings)
        stop.callback(store.close)
        audit = audit_trail(settings, store)
        stop.callback(audit.close)
        yield retention_of(settings, store, audit)


def _every_role_here() -> dict[str, list[int]]:
    return {role: [os.getpid()] for role in ROLES}


def http_services(settings: Settings, store: Store, audit: AuditTrail,
                  serving: Callable[[], dict[str, list[int]]] = _every_role_here,
                  wake_publisher: Callable[[], None] = lambda: None,
                  budget: ResourceBudget | None = None,
                  metrics: CollectorRegistry = REGISTRY,
                  render_cache_bytes: int | None = None) -> Services:
    """What the HTTP side works with, over ``store`` and the data dir of ``settings``
    (``serving`` defaults to every role in this process, as in tests)."""
    return Services(
        store=store, outbox=Outbox(store.index), audit=audit,
        render_cache=RenderCache(settings.data_dir / "cache" / "rendered",
                                 settings.imaging.render_cache_bytes
                                 if render_cache_bytes is None else render_cache_bytes),
        budget=budget or resource_budget(settings, store),
        deidentify_key=load_or_create_key(settings.data_dir),
        session_key=session_key(settings.auth, settings.data_dir)
        if settings.auth.sign_in else b"",
        public_url=settings.http.public_url,
        max_instance_bytes=settings.ingest.max_instance_bytes,
        body_timeout_seconds=settings.http.body_timeout_seconds,
        serving=serving, wake_publisher=wake_publisher,
        registry_url=settings.publication.registry_url,
        registry_probe=RegistryProbe(settings.publication.registry_url,
                                     functools.partial(registry_tls, settings.publication))
        if settings.publication.registry_url else None,
        metrics=metrics, restorer=Restorer(PacsConfig.of(settings), store),
        retention=retention_of(settings, store, audit))


def _beat_while(context: ProcessContext, serving: Callable[[], bool]) -> None:
    """A thread beating for this process every BEAT_SECONDS while ``serving()``."""

    def beat() -> None:
        while True:
            if serving():
                context.beat()
            time.sleep(BEAT_SECONDS)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def _shared_slots(context: ProcessContext) -> tuple[AssociationSlots, SharedClientCounts]:
    """What a DICOM receiver counts with the others: connections, associations, and the
    associations of each client."""
    dicom, board, run_dir = context.settings.dicom, context.board, context.run_dir
    assert context.associations is not None
    peers = [slot for slot in board.slots_of(DICOM) if slot != context.slot]
    slots = AssociationSlots(
        dicom.max_pending_connections, dicom.max_associations,
        SharedTally(tally_path(run_dir, "dicom_pending"), context.slot),
        SharedTally(tally_path(run_dir, "dicom_served"), context.slot),
        lambda: [slot for slot in peers if board.serves(slot)])
    clients = SharedClientCounts(dicom.max_associations_per_client, context.associations,
                                 context.slot, FileLock(run_dir / "dicom_clients.lock"))
    return slots, clients


def run_dicom_role(context: ProcessContext) -> None:
    """A DICOM receiver (C-ECHO, C-STORE SCP) on the supervisor's socket until SIGTERM;
    associations in progress then finish within the grace period (DicomService.stop)."""
    settings = context.settings
    assert context.listener is not None
    with contextlib.ExitStack() as stop:
        store = open_store(settings)
        stop.callback(store.close)
        audit = audit_trail(settings, store)
        stop.callback(audit.close)
        budget = resource_budget(settings, store, context)
        slots, clients = _shared_slots(context)
        dicom = DicomService(settings.dicom, store, audit, budget,
                             server_tls(settings) if settings.dicom.tls else None,
                             context.listener, slots, clients, settings.pacs.move_destinations,
                             Restorer(PacsConfig.of(settings), store))
        stop.callback(dicom.stop)
        dicom.start()
        stopping = threading.Event()
        _beat_while(context, lambda: dicom.is_serving() and not stopping.is_set())
        try:
            while True:
                # Not signal.pause(): a signal handled between its last check for one and
                # its pause() would leave it waiting for the next signal.
                time.sleep(1.0)  # until the handler raises
        except ShutdownRequestedError as exc:
            log.info("%s received: stopping the DICOM SCP", exc)
            # Off the board at once: the other receivers stop leaving connections to this
            # one, and /health stops counting it.
            stopping.set()
            context.board.retire(context.slot)


def _waker(connection: Connection | None) -> Callable[[], None]:
    """Poke the background worker's publisher through the write end of its pipe; a full
    pipe already holds a poke."""
    if connection is None:
        return lambda: None
    fd = connection.fileno()
    os.set_blocking(fd, False)

    def wake() -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(fd, b"\0")

    return wake


def run_http_role(context: ProcessContext) -> None:
    """One HTTP worker on the supervisor's listening socket, until SIGTERM: then it stops
    accepting and finishes the requests in progress."""
    settings, http = context.settings, context.settings.http
    assert context.listener is not None
    assert context.connections is not None and context.requests is not None
    with contextlib.ExitStack() as stop:
        store = open_store(settings)
        stop.callback(store.close)
        audit = audit_trail(settings, store)
        stop.callback(audit.close)
        services = http_services(
            settings, store, audit, context.board.serving, _waker(context.wake),
            resource_budget(settings, store, context),
            scrape_registry(OutboxCollector(Outbox(store.index)),
                            ServiceCollector(context.board.restart_counts, context.recovery)),
            # Each worker bounds what it writes; together they stay within the setting.
            settings.imaging.render_cache_bytes // http.worker_count())
        config = uvicorn.Config(
            create_app(services, http, settings.auth, SharedClientCounts(
                http.max_requests_per_client, context.requests, context.slot)),
            log_config=None,
            access_log=False, server_header=False, lifespan="off",
            limit_concurrency=http.max_connections,
            timeout_keep_alive=http.keep_alive_seconds,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            ssl_certfile=settings.tls.cert_file or None,
            ssl_keyfile=settings.tls.key_file or None,
            http=guarded_protocol(http.head_timeout_seconds, SharedClientCounts(
                http.max_connections_per_client, context.connections, context.slot)))
        config.load()
        config.ssl = server_tls(settings)  # ours: TLS >= 1.2 and client certificates
        try:
            # uvicorn handles SIGTERM/SIGINT while it runs and raises it again once drained.
            # It beats from its event loop: a wedged loop stops beating.
            TickingServer(config, context.beat).run(sockets=[context.listener])
        except ShutdownRequestedError as exc:
            log.info("%s received: HTTP worker drained", exc)


def _wake_on_pokes(connection: Connection, wake: Callable[[], None]) -> None:
    """A thread waking the publisher at each poke the HTTP workers write to the pipe."""

    def read() -> None:
        while os.read(connection.fileno(), 512):
            wake()

    threading.Thread(target=read, name="publisher-wake", daemon=True).start()


def run_background_role(context: ProcessContext) -> None:
    """The stable-study watcher, the publisher, the retention pass (with a PACS peer) and
    the control channel, until SIGTERM; then the publisher stops after the row in
    progress, the retention pass after the study in progress."""
    settings, publication = context.settings, context.settings.publication
    with contextlib.ExitStack() as stop:
        store = open_store(settings)
        stop.callback(store.close)
        audit = audit_trail(settings, store)
        stop.callback(audit.close)
        watcher = StableStudyWatcher(Outbox(store.index), publication.stable_seconds)
        publisher = None
        if publication.registry_url:
            dicom = settings.dicom
            origin = RetrieveOrigin(settings.http.public_url, settings.producer.gateway_oid,
                                    settings.producer.organization_name,
                                    dicom.ae_title if dicom.serves_query_retrieve else "")
            publisher = Publisher(
                store, RegistryClient(publication.registry_url, publication.registry_timeout,
                                      registry_tls(publication)),
                load_event_codes(_optional_path(publication.event_codes_file)), audit,
                settings.producer, origin, publication,
                Leases(context.service, context.gone if settings.is_replica() else None))
            stop.callback(publisher.stop)
        else:
            log.warning("registry_url is not set: manifests are queued, not sent")
        stop.callback(watcher.stop)
        wake = publisher.wake if publisher is not None else lambda: None
        if context.wake is not None:
            _wake_on_pokes(context.wake, wake)
        control = ControlChannel(settings.data_dir, settings.is_replica())
        stop.callback(control.close)
        control.open()
        # The admin routes of the control channel neither decode nor render.
        services = http_services(settings, store, audit, context.board.serving, wake,
                                 resource_budget(settings, store, context),
                                 render_cache_bytes=0)
        # Without a PACS peer nothing is ever removed: no pass to run.
        retention = RetentionWorker(services.retention) \
            if services.retention is not None and settings.pacs.peers else None
        if retention is not None:
            stop.callback(retention.stop)
        watcher.start()
        if publisher is not None:
            publisher.start()
        if retention is not None:
            retention.start()
        workers = [worker for worker in (watcher, publisher, retention) if worker is not None]

        def beat_while_working() -> None:
            if all(worker.alive for worker in workers):
                context.beat()
        try:
            control.serve(services, beat_while_working)
        except ShutdownRequestedError as exc:
            log.info("%s received: stopping the publisher", exc)
