"""The control channel: the admin API (``gateway.web.admin``) of a running ``passerelle
serve`` on a Unix domain socket in its data dir, ``<data_dir>/control.sock``, so that the
commands run beside the service (``publish``, ``outbox retry``...) act through it. Replicas
sharing a data dir (on a network file system, where a socket is reachable from its own host
only) each listen on ``<data_dir>/replicas/<host>.sock``: the commands reach the replica of
their host.

The socket is mode 0600: whoever can open it (the service's user, or root) can already read
and write the data dir, so a request over it acts as the local operator, with every admin
right and no token. The TCP listener and its authentication are not involved.

It is served by the background worker of ``passerelle serve`` (gateway.service), beside the
publisher it wakes, with uvicorn: on SIGTERM or SIGINT it stops taking requests, gives those
in progress ``_STOP_SECONDS``, and raises the signal again for the worker to stop the rest.
"""

import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from gateway.web import admin
from gateway.web.http.errors import http_exception, internal_error
from gateway.web.middleware.request_target import RequestTargetMiddleware
from gateway.web.services import Services
from storage.recovery import DataDirBusyError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
_MAX_ADDRESS_BYTES = 107  # sockaddr_un.sun_path is 108 bytes with the final NUL (Linux)
_PROBE_SECONDS = 2
_STOP_SECONDS = 5  # an admin request still running when the service stops gets this long


def socket_path(data_dir: Path, replica: bool = False) -> Path:
    """Where the service on ``data_dir`` (a replica of this host, if ``replica``) listens
    for control requests."""
    return data_dir / "replicas" / f"{socket.gethostname()}.sock" if replica \
        else data_dir / SOCKET_NAME


def _address(path: Path) -> str:
    """``path`` as a socket address; OSError when the system cannot bind or reach it."""
    if len(os.fsencode(path)) > _MAX_ADDRESS_BYTES:
        raise OSError(f"control socket path {path} is longer than the {_MAX_ADDRESS_BYTES} "
                      "bytes a Unix socket address may have: use a shorter data_dir")
    return str(path)


def is_listening(path: Path) -> bool:
    """True when a server accepts connections on the socket ``path``; False when there is
    no socket or nobody listens on it (left by a service that died). Other errors (no
    permission) are raised."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_SECONDS)  # a wedged service must not hang the command
        try:
            probe.connect(_address(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def client(data_dir: Path, timeout: float = 30) -> httpx.Client | None:
    """An HTTP client of the control API of the service running on ``data_dir`` (or of
    this host's replica); None when no service runs there."""
    for path in (socket_path(data_dir), socket_path(data_dir, replica=True)):
        # (a path too long for a socket: the service could not listen there)
        if len(os.fsencode(path)) <= _MAX_ADDRESS_BYTES and is_listening(path):
            return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)),
                                base_url="http://passerelle", timeout=timeout)
    return None


def create_control_app(services: Services) -> Starlette:
    """The admin routes over ``services``, without authentication (see the module)."""
    app = Starlette(routes=admin.ROUTES, exception_handlers={
        HTTPException: http_exception, Exception: internal_error},
        # The handlers read the request as parsed once, as behind the HTTP listener.
        middleware=[Middleware(RequestTargetMiddleware, routes=admin.ROUTES)])
    app.state.services = services
    return app


class TickingServer(uvicorn.Server):
    """A uvicorn server calling ``tick`` from its event loop about ten times a second."""

    def __init__(self, config: uvicorn.Config, tick: Callable[[], None]) -> None:
        super().__init__(config)
        self.tick = tick

    async def on_tick(self, counter: int) -> bool:
        """``tick``, then uvicorn's own housekeeping (True: time to stop)."""
        self.tick()
        return await super().on_tick(counter)


class ControlChannel:
    """The listening socket of the control API, from ``open`` to ``close``."""

    def __init__(self, data_dir: Path, replica: bool = False) -> None:
        self.path = socket_path(data_dir, replica)
        self.replica = replica
        self._socket: socket.socket | None = None

    def open(self) -> None:
        """Create the socket (mode 0600) and listen; one left by a service that died is
        replaced, a live one is refused (DataDirBusyError). Where no socket can be made (a
        data dir path too long for a socket address, a file system without sockets), the
        service runs without: commands then queue in the data dir and say so. A replica
        finding another replica of its host there runs without too (commands reach that one,
        and every replica reads the outbox)."""
        try:
            self._remove_stale()
        except DataDirBusyError:
            if not self.replica:
                raise
            log.warning("another replica of this host answers on %s: this one runs without "
                        "a control socket", self.path)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket file is born 0600 (umask 0177 around bind): there is no moment when
        # another user could connect. Called at start-up, before other threads create files.
        try:
            previous = os.umask(0o177)
            try:
                sock.bind(_address(self.path))
            finally:
                os.umask(previous)
            sock.listen()
        except OSError as exc:
            sock.close()
            self.path.unlink(missing_ok=True)
            log.warning("no control socket (%s): commands beside the service will queue in "
                        "the data dir without asking it", exc)
            return
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        log.info("control API on %s", self.path)

    def _remove_stale(self) -> None:
        if len(os.fsencode(self.path)) > _MAX_ADDRESS_BYTES:
            return  # no socket can be there
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{self.path} exists and is not a socket: move it away")
        if is_listening(self.path):
            raise DataDirBusyError(f"a service already answers on {self.path}")
        self.path.unlink()

    def serve(self, services: Services, tick: Callable[[], None]) -> None:
        """Answer control requests until SIGTERM or SIGINT, which is raised again once the
        requests in progress are done; ``tick`` is called about ten times a second from the
        server's loop. Without a socket (see ``open``), only wait for the signal."""
        if self._socket is None:
            while True:  # until the signal handler raises
                tick()
                time.sleep(0.1)
        server = TickingServer(uvicorn.Config(
            create_control_app(services), log_config=None, access_log=False,
            server_header=False, lifespan="off", timeout_graceful_shutdown=_STOP_SECONDS),
            tick)
        server.run(sockets=[self._socket])

    def close(self) -> None:
        """Stop listening and remove the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            self.path.unlink(missing_ok=True)
