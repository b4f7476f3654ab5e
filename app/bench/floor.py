"""The idle-memory baseline: a bare Quart-Trio WebSocket route on eventchat's Hypercorn config.

    python -m app.bench.floor --port N

Its ``/ws/chat`` accepts and then only receives, so the memory an idle connection costs here
is what the framework (Quart-Trio, Hypercorn, wsproto) holds before any application code:
the floor to compare eventchat's figure with. ``/metrics`` reports the open connections in
eventchat's gauge name and ``/health`` answers 200, so the bench drives it like the server.
"""

from __future__ import annotations

import argparse

import trio
from hypercorn.trio import serve
from quart import websocket
from quart_trio import QuartTrio

from ..config import Settings
from ..web.server import hypercorn_config


def bare_app() -> QuartTrio:
    app = QuartTrio(__name__)
    open_connections = 0

    @app.websocket("/ws/chat")
    async def chat() -> None:
        nonlocal open_connections
        await websocket.accept()
        open_connections += 1
        try:
            while True:
                await websocket.receive()
        finally:
            open_connections -= 1

    @app.get("/metrics")
    async def metrics() -> str:
        return f"eventchat_websocket_connections {open_connections}\n"

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = hypercorn_config(Settings(host="127.0.0.1", port=args.port))
    trio.run(serve, bare_app(), config)


if __name__ == "__main__":
    main()
