"""A TCP proxy in front of the local registry that fails on demand, for the outbox tests:
``forward`` (pass through), ``503`` (answers Service Unavailable), ``400`` (answers Bad
Request with an OperationOutcome), ``hang`` (reads the request,
never answers: a timeout), ``lose-answer`` (forwards the request, then drops the answer, so
the registry has the document but the gateway does not know)."""

import asyncio
import threading

from tests.processes import free_port


def _canned(status: bytes, code: bytes, diagnostics: bytes) -> bytes:
    body = (b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"%s",'
            b'"diagnostics":"%s"}]}' % (code, diagnostics))
    return (b"HTTP/1.1 %s\r\nContent-Type: application/fhir+json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))


_CANNED = {"503": _canned(b"503 Service Unavailable", b"transient", b"under maintenance"),
           "400": _canned(b"400 Bad Request", b"invalid", b"unknown assigning authority")}


class FaultyProxy:
    """Listens on 127.0.0.1:``port`` and relays to 127.0.0.1:``upstream`` per ``mode``."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.mode = "forward"
        self.requests: list[str] = []  # "METHOD path" of each request seen
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        """The FHIR base URL through the proxy."""
        return f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def cancel_connections() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_connections(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head + (await reader.readexactly(length) if length else b"")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await self._read_request(reader)
                self.requests.append(b" ".join(request.split(b" ", 2)[:2]).decode())
                if not await self._answer(request, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, request: bytes, writer: asyncio.StreamWriter) -> bool:
        """Handle one request; False when the connection must be closed."""
        mode = self.mode
        if mode in _CANNED:
            writer.write(_CANNED[mode])
            await writer.drain()
            return False
        if mode == "hang":
            await asyncio.sleep(3600)
            return False
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        head, _, body = request.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\r\n")
                 if not line.lower().startswith(b"connection:")]
        up_writer.write(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body)
        await up_writer.drain()
        answer = await up_reader.read()
        up_writer.close()
        if mode == "lose-answer":
            await asyncio.sleep(3600)
            return False
        writer.write(answer.replace(b"connection: keep-alive", b"connection: close"))
        await writer.drain()
        return False
