"""The HTTP listening socket of the supervisor: the connections it accepts get TCP_NODELAY
from asyncio (as uvicorn's workers run them), so a response written in two sends does not
wait for the client's delayed ACK on a keep-alive connection."""

import asyncio
import socket

from gateway.supervisor import listen


def test_connections_accepted_on_the_http_socket_have_tcp_nodelay() -> None:
    listener = listen("127.0.0.1", 0, 16)
    port = listener.getsockname()[1]
    options: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            options.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def accept_one() -> None:
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            while not options:
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(asyncio.wait_for(accept_one(), 10))
    assert options == [1]
