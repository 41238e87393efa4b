"""``passerelle serve``: one supervisor and its processes on one machine.

The supervisor holds the data dir (ServiceLock), removes the temporary files of interrupted
writes and, after an unclean stop, checks the index against the files, once, before any
child starts. It binds the DICOM and the HTTP listening sockets, which every DICOM
receiver and every HTTP worker then accepts on (no SO_REUSEPORT: no other process can bind
the ports beside them), and forks ``dicom.receivers`` DICOM receivers, ``http.workers``
HTTP workers and the background worker (gateway.service). Receivers are processes, not
threads of one: a C-STORE costs the interpreter milliseconds of CPU, and threads of one
process share one at a time. It runs no thread and holds no open index when it forks, so
each child starts from a clean copy with every module already imported (no import at each
start or restart).

A child that dies is logged (role, pid, exit code or signal) and started again after a
delay that doubles with each quick death (``_RESTART_FIRST`` to ``_RESTART_MAX`` seconds);
one that dies before it ever served, at start, stops the service ("cannot serve"). SIGTERM
or SIGINT is passed to every child as SIGTERM (each drains as ``passerelle serve`` always
did; further signals are ignored); a child still running ``_stop_seconds`` later is
killed, and logged. Children get SIGKILL from the kernel if the supervisor itself dies
(PR_SET_PDEATHSIG), so none is left holding a port.
"""

import contextlib
import ctypes
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from gateway import service
from gateway.config import Settings
from gateway.imaging.deidentify import load_or_create_key
from gateway.liveness import BACKGROUND, DICOM, HTTP, Board
from gateway.run_dir import remove_run_dirs
from gateway.security.client_counts import ClientTable
from gateway.service import ProcessContext, registry_tls, server_tls
from gateway.shared_tally import clear_slot, create_tally
from gateway.web.middleware.session import session_key
from storage.database import database_url, masked, sqlite_file
from storage.recovery import ServiceLock, recover

log = logging.getLogger(__name__)

_RESTART_FIRST = 0.5  # seconds before a child that died is started again
_RESTART_MAX = 30.0
_STEADY_SECONDS = 60.0  # a child that ran this long died once, not in a loop
_STOP_MARGIN = 30.0  # beyond the DICOM grace: in-flight HTTP responses
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_FD_SETSIZE = 1024  # select()'s bound on descriptors (sys/select.h)
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_ROLES: dict[str, Callable[[ProcessContext], None]] = {
    DICOM: service.run_dicom_role, BACKGROUND: service.run_background_role,
    HTTP: service.run_http_role}


class ChildFailedError(RuntimeError):
    """A process of the service died at start, before it served."""


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the supervisor dies (Linux)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def _ignore_further_signals(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGINT in a child: stop (once: a second signal must not cut the drain)."""
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    service.request_shutdown(signum, frame)


def _child_main(role: str, context: ProcessContext, parent: int,
                others: list[socket.socket]) -> None:
    """Entry point of a child process: run its role until asked to stop. Its copies of the
    ``others`` listening sockets, which it does not serve, are closed at once: a socket
    listens as long as one process holds it, and a stopping service must refuse
    connections, not queue them for nobody."""
    _die_with_parent(parent)
    for sock in others:
        sock.close()
    from gateway.cli import configure_logging

    configure_logging(context.settings.log_level, with_process=True)
    if role != HTTP:
        _keep_descriptors_selectable()
    if role == DICOM:
        os.nice(context.settings.dicom.nice)
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _ignore_further_signals)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # one pending is raised here
        _ROLES[role](context)
    except service.ShutdownRequestedError:
        pass  # signalled while starting: nothing served yet, nothing to drain
    except (OSError, ValueError) as exc:
        logging.getLogger("passerelle").error("cannot serve: %s", exc)
        sys.exit(1)


def listen(host: str, port: int, backlog: int, dual_stack: bool = False) -> socket.socket:
    """A listening socket every process of one role accepts on; an IPv6 one takes IPv4
    connections too only when ``dual_stack`` and the system allows it (``bindv6only``), as
    pynetdicom's own socket did for DICOM (HTTP follows asyncio: IPv6 only).

    Made with its protocol named (IPPROTO_TCP), unlike ``socket.create_server``'s: the
    sockets it accepts inherit it, and asyncio sets TCP_NODELAY only on a socket whose
    protocol says TCP. Without it an HTTP response written in two sends (head, then body)
    waits for the client's delayed ACK, 40 ms per request on a keep-alive connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _raise_open_file_limit() -> None:
    """The soft limit of open files up to the hard one, for the children to inherit: a
    WADO-RS retrieve holds its files open to send an exact Content-Length (at most a quarter
    of the soft limit, gateway.web.dicomweb.stored_files), and systemd's default soft limit
    (1024) would send any study of more than 256 instances chunked. The processes that use
    pynetdicom lower it again (``_keep_descriptors_selectable``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _keep_descriptors_selectable() -> None:
    """The soft limit of open files back to at most FD_SETSIZE (1024): pynetdicom waits on
    its sockets with ``select()``, which cannot take a descriptor of 1024 or more; past the
    limit an association is refused (EMFILE) instead of failing inside pynetdicom."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > _FD_SETSIZE:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_FD_SETSIZE, hard))


@dataclass
class _Child:
    """One process slot: its role, its current process, its restart state."""

    slot: int
    role: str
    process: BaseProcess | None = None
    started: float = 0.0
    quick_deaths: int = 0  # deaths in a row of a process that ran less than _STEADY_SECONDS
    restart_at: float = 0.0
    generation: int = 0


class Supervisor:
    """Runs the processes of the service on ``settings`` until SIGTERM or SIGINT."""

    def __init__(self, settings: Settings, service: str, run_dir: Path) -> None:
        self.settings = settings
        self.service = service
        self.run_dir = run_dir  # this service's alone, even on a data dir replicas share
        self.metrics_dir = run_dir / "metrics"  # PROMETHEUS_MULTIPROC_DIR (gateway.cli)
        self.receivers = settings.dicom.receiver_count()
        self.workers = settings.http.worker_count()
        self.board = Board.create([DICOM] * self.receivers + [BACKGROUND]
                                  + [HTTP] * self.workers)
        # Per-client limits of HTTP over every worker, of DICOM over every receiver (a row
        # per slot of the board).
        self.client_tables = (ClientTable(self.board.size), ClientTable(self.board.size))
        self.associations = ClientTable(self.board.size)
        self._context = multiprocessing.get_context("fork")
        self._stop_requested = ""
        self._stop_seconds = settings.dicom.shutdown_grace_seconds + _STOP_MARGIN
        self._clean = True  # no child died or had to be killed
        self._children = [_Child(slot, role) for slot, role in enumerate(self.board.roles)]
        self._listeners: dict[str, socket.socket] = {}  # by the role that accepts on it

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop every child. DataDirBusyError,
        OSError, ValueError or ChildFailedError when the service cannot start."""
        settings = self.settings
        settings.check_http_exposure()
        server_tls(settings)  # unusable TLS files are refused before anything starts
        registry_tls(settings.publication)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        _raise_open_file_limit()
        replica = settings.is_replica()
        lock = ServiceLock(settings.data_dir, replica, self.service, None if replica else
                           sqlite_file(database_url(settings.database_url, settings.data_dir)))
        lock.acquire()
        with contextlib.ExitStack() as stop:
            stop.callback(lambda: lock.release(clean=self._clean))
            stop.callback(log.info, "stopped")
            recovery = self._check_data_dir(lock)
            self._prepare_run_dir(lock.gone)
            listener = listen(settings.http.host, settings.http.port, 2048)
            stop.callback(listener.close)
            dicom = settings.dicom
            dicom_listener = listen(dicom.host, dicom.port, dicom.max_pending_connections,
                                    dual_stack=True)
            stop.callback(dicom_listener.close)
            self._listeners = {HTTP: listener, DICOM: dicom_listener}
            reader, writer = self._context.Pipe(duplex=False)
            stop.callback(reader.close)
            stop.callback(writer.close)
            wakes = {HTTP: writer, BACKGROUND: reader}
            contexts = {child.slot: ProcessContext(
                settings, child.slot, self.board, self.run_dir, recovery,
                self._listeners.get(child.role), wakes.get(child.role),
                *(self.client_tables if child.role == HTTP else (None, None)),
                self.associations if child.role == DICOM else None,
                service=self.service, gone=tuple(lock.gone))
                for child in self._children}
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_signal)
            stop.callback(self._stop_children)
            log.info("starting %d DICOM receiver(s), %d HTTP worker(s) and the background "
                     "worker", self.receivers, self.workers)
            self._supervise(contexts)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requested = signal.Signals(signum).name
        # Once: a second signal must not cut the children's drain, nor kill this process
        # as it exits (Python restores the default action of its handlers at exit, not
        # of ignored signals).
        for other in _STOP_SIGNALS:
            signal.signal(other, signal.SIG_IGN)

    def _check_data_dir(self, lock: ServiceLock) -> dict[str, int]:
        """Purge interrupted writes, create the index and the de-identification key if
        new; after an unclean stop, recover (what it found)."""
        store = service.open_store(self.settings)
        log.info("index database: %s", masked(store.index.database.url))
        try:
            # Only the lock holder may purge: an import running beside the service has its
            # own temporary files in flight.
            removed = lock.purge_temporary(store.blobs)
            if removed:
                log.warning("removed %d temporary file(s) left by an interrupted write",
                            removed)
            # The data dir's keys, made before any child starts (a failure stops the start).
            load_or_create_key(self.settings.data_dir)
            if self.settings.auth.sign_in:
                session_key(self.settings.auth, self.settings.data_dir)
            if lock.previous_stop_was_clean:
                return {}
            log.warning("previous run did not stop cleanly: checking the index against "
                        "the files")
            return recover(store.blobs, store.index).counts()
        finally:
            store.close()

    def _prepare_run_dir(self, gone: list[str]) -> None:
        """An empty metrics directory for this run and zeroed budget tallies; the run dirs of
        the dead replicas ``gone`` are removed."""
        remove_run_dirs(self.run_dir, gone)
        for left in self.metrics_dir.iterdir():  # by an earlier run
            left.unlink()
        for name in service.TALLIES:
            create_tally(service.tally_path(self.run_dir, name), self.board.size)

    def _start(self, child: _Child, context: ProcessContext) -> None:
        peers = self.board.slots_of(child.role)
        others = [sock for role, sock in self._listeners.items() if role != child.role]
        process = self._context.Process(
            target=_child_main, args=(child.role, context, os.getpid(), others),
            name=child.role if len(peers) == 1 else f"{child.role}-{peers.index(child.slot) + 1}")
        # Blocked across the fork: a signal must reach the child's handlers, not the copy
        # of the supervisor's (the child unblocks them once its own are installed).
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if child.generation:
            self.board.count_restart(child.role)
            log.info("%s process started again as pid %d", child.role, process.pid)
        child.process, child.started = process, time.monotonic()
        child.generation += 1

    def _supervise(self, contexts: dict[int, ProcessContext]) -> None:
        for child in self._children:
            self._start(child, contexts[child.slot])
        while not self._stop_requested:
            running = [c.process.sentinel for c in self._children if c.process is not None]
            wait(running, timeout=0.2)
            if self._stop_requested:  # a child that stopped on the same signal is not dead
                break
            now = time.monotonic()
            for child in self._children:
                if child.process is None:
                    if now >= child.restart_at and not self._stop_requested:
                        self._start(child, contexts[child.slot])
                elif not child.process.is_alive():
                    self._died(child, now)
        log.info("%s received: stopping every process", self._stop_requested)

    def _forget(self, child: _Child) -> int:
        """Clear what the process of ``child`` held (board, tallies, live gauges)."""
        assert child.process is not None
        pid = child.process.pid
        assert pid is not None
        child.process.join()
        self.board.clear(child.slot)
        for table in (*self.client_tables, self.associations):  # closed with it
            table.clear(child.slot)
        for name in service.TALLIES:
            clear_slot(service.tally_path(self.run_dir, name), child.slot)
        mark_process_dead(pid, str(self.metrics_dir))
        child.process = None
        return pid

    def _died(self, child: _Child, now: float) -> None:
        assert child.process is not None
        code = child.process.exitcode
        assert code is not None
        first = child.generation == 1
        served = self.board.has_beaten(child.slot, child.process.pid or 0)
        pid = self._forget(child)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else \
            f"exited with code {code}"
        self._clean = False
        if first and not served:
            raise ChildFailedError(f"the {child.role} process (pid {pid}) {how} before it "
                                   "served")
        child.quick_deaths = child.quick_deaths + 1 if now - child.started < _STEADY_SECONDS \
            else 1
        delay = min(_RESTART_MAX, _RESTART_FIRST * 2 ** (child.quick_deaths - 1))
        child.restart_at = now + delay
        log.error("%s process (pid %d) %s: starting it again in %.1f s", child.role, pid,
                  how, delay)

    def _stop_children(self) -> None:
        """SIGTERM to every child, then wait for them; SIGKILL to any still running after
        ``_stop_seconds``."""
        running = [c for c in self._children if c.process is not None]
        for child in running:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.terminate()
        # Each listening socket closes once the processes serving it have closed theirs:
        # from then on a connection is refused, not left waiting for nobody.
        for sock in self._listeners.values():
            sock.close()
        deadline = time.monotonic() + self._stop_seconds
        while running and time.monotonic() < deadline:
            wait([c.process.sentinel for c in running if c.process is not None],
                 timeout=max(0.0, deadline - time.monotonic()))
            for child in [c for c in running if c.process is not None
                          and not c.process.is_alive()]:
                code = child.process.exitcode if child.process is not None else 0
                if code:
                    self._clean = False
                    log.warning("%s process exited with code %s while stopping", child.role,
                                code)
                self._forget(child)
                running.remove(child)
        for child in running:
            assert child.process is not None
            log.error("%s process (pid %d) did not stop within %.0f s: killed", child.role,
                      child.process.pid, self._stop_seconds)
            self._clean = False
            child.process.kill()
            self._forget(child)


def serve(settings: Settings, service: str, run_dir: Path) -> None:
    """Run ``passerelle serve`` until SIGINT/SIGTERM (see the module) as ``service``
    (``storage.recovery.service_name``); ``run_dir`` (``run_dir_of``) holds the
    PROMETHEUS_MULTIPROC_DIR prometheus_client was imported with."""
    Supervisor(settings, service, run_dir).run()
