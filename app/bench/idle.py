"""Server memory per idle WebSocket connection, with and without permessage-deflate.

Opens ``count`` WebSocket connections to ``/ws/chat`` (raw ``wsproto`` over trio sockets, so
the client offers exactly the extensions asked for: none, or ``permessage-deflate`` as every
browser does), leaves them idle, and reads the server's resident memory before and after.
The server's own ``eventchat_websocket_connections`` gauge must show every one of them.

With ``exchange``, each connection first sends one frame and waits for the answer (an unknown
event: the server answers with an ``error`` frame), as a browser tab that subscribed once and
then sat idle: with permessage-deflate, that is when both ends set up their zlib streams.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

#: Handshakes in flight at once (the listen backlog is small).
OPENING = 100
#: The ``EVENTCHAT_METRICS_TOKEN`` the bench gives its servers, to read their gauge.
METRICS_TOKEN = "bench-metrics"


@dataclass
class IdleResult:
    connections: int
    deflate: bool
    exchange: bool
    negotiated: list[str]
    rss_before: int
    rss_after: int
    server_count: int

    @property
    def per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / max(1, self.connections)


async def _open(port: int, token: str, deflate: bool, exchange: bool
                ) -> tuple[trio.SocketStream, list[str]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = WSConnection(ConnectionType.CLIENT)
    extensions = [PerMessageDeflate()] if deflate else []
    await stream.send_all(conn.send(Request(host=f"127.0.0.1:{port}",
                                            target=f"/ws/chat?access_token={token}",
                                            extensions=extensions)))
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("the server closed the connection during the handshake")
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, AcceptConnection):
                names = [e.name for e in event.extensions]
                if not exchange:
                    return stream, names
                await stream.send_all(conn.send(TextMessage('{"event": "idle"}')))
            elif isinstance(event, TextMessage):
                return stream, names
            elif isinstance(event, RejectConnection):
                raise ConnectionError(f"handshake refused: {event.status_code}")


async def server_connections(client: httpx.AsyncClient) -> int:
    text = (await client.get("/metrics")).text
    match = re.search(r"^eventchat_websocket_connections (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else -1


async def measure_idle(port: int, token: str, count: int, deflate: bool, exchange: bool,
                       rss: Callable[[], int], settle_s: float = 2.0) -> IdleResult:
    streams: list[trio.SocketStream] = []
    negotiated: set[str] = set()
    limit = trio.Semaphore(OPENING)
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as http:
        await trio.sleep(settle_s)
        before = rss()

        async def one() -> None:
            async with limit:
                stream, names = await _open(port, token, deflate, exchange)
            streams.append(stream)
            negotiated.update(names)

        try:
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for _ in range(count):
                        nursery.start_soon(one)
            await trio.sleep(settle_s)
            after = rss()
            counted = await server_connections(http)
        finally:
            with trio.CancelScope(shield=True):
                for stream in streams:
                    await stream.aclose()
        await trio.sleep(settle_s)
    return IdleResult(len(streams), deflate, exchange, sorted(negotiated), before, after,
                      counted)
