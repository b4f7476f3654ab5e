"""The server's WebSocket keep-alive pings: on by default, a setting to turn them off."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Request

from .conftest import running_server, web_settings


async def pings_within(settings: Any, seconds: float) -> int:
    """Opens a quiet WebSocket and counts the pings the server sends in ``seconds``."""
    async with running_server(settings) as server:
        url = urlsplit(server.base_url)
        stream = await trio.open_tcp_stream(url.hostname, url.port)
        ws = WSConnection(ConnectionType.CLIENT)
        target = f"/ws/chat?access_token={server.tokens['alice']}"
        await stream.send_all(ws.send(Request(host=url.netloc, target=target)))
        pings, accepted = 0, False
        with trio.move_on_after(seconds):
            while True:
                data = await stream.receive_some(65536)
                assert data, "the server closed the connection"
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        accepted = True
                    elif isinstance(event, Ping):
                        pings += 1
                        await stream.send_all(ws.send(event.response()))
        assert accepted
        await stream.aclose()
    return pings


async def test_quiet_connections_are_pinged_unless_turned_off(settings: Any) -> None:
    assert await pings_within(web_settings(settings, ws_ping_interval_s=0.2), 1.1) >= 3
    assert await pings_within(web_settings(settings, ws_ping_interval_s=0), 1.1) == 0
