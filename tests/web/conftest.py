"""A real Hypercorn server on 127.0.0.1 port 0 per test, on each store, with real clients."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from app.config import Settings
from app.storage.users import add_user
from app.web.server import serve
from tests.fakes.openai_server import fake_openai_server

START_S = 20.0
STOP_S = 15.0
#: The scraper's token (``/metrics``) of every test server but those that set another.
METRICS_TOKEN = "test-metrics-token"


@dataclass
class Server:
    settings: Settings
    base_url: str
    tokens: dict[str, str]
    stopping: trio.Event

    def stop(self) -> None:
        """Begins a graceful shutdown (as a signal would)."""
        self.stopping.set()

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/ws/chat"

    def headers(self, user: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def scraper(self) -> httpx.AsyncClient:
        """A client holding the metrics token (``/metrics``), not a user's."""
        headers = {"Authorization": f"Bearer {self.settings.metrics_token}"}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=20)

    def client(self, user: str | None = "alice", **kwargs: Any) -> httpx.AsyncClient:
        headers = self.headers(user) if user else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=20, **kwargs)

    def websocket(self, user: str = "alice", extra_headers: Any = ()) -> Any:
        header = (b"Authorization", f"Bearer {self.tokens[user]}".encode())
        return open_websocket_url(self.ws_url, extra_headers=[header, *extra_headers])


def web_settings(settings: Settings, **changes: Any) -> Settings:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "offline_token_delay_s": 0.002,
                              "metrics_token": METRICS_TOKEN}
    return settings.replace(**{**values, **changes})


@asynccontextmanager
async def running_server(settings: Settings, grace_s: float = 1.0,
                         **collaborators: Any) -> AsyncIterator[Server]:
    """Serves ``settings`` until the block ends, then shuts the server down gracefully;
    ``collaborators`` (``tools``, ...) go to ``serve``."""
    tokens = {}
    for name in ("alice", "bob"):
        tokens[name] = await trio.to_thread.run_sync(add_user, settings, name)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_S):
            host, port = await nursery.start(
                partial(serve, settings, shutdown_trigger=stop.wait, grace_s=grace_s,
                        handle_signals=False, **collaborators)
            )
        try:
            yield Server(settings, f"http://{host}:{port}", tokens, stop)
        finally:
            stop.set()
            with trio.fail_after(STOP_S):
                while nursery.child_tasks:  # noqa: ASYNC110 - waiting for serve() to return
                    await trio.sleep(0.01)


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[Server]:
    async with running_server(web_settings(settings)) as srv:
        yield srv


async def receive(ws: WebSocketConnection, limit_s: float = 10.0) -> dict[str, Any]:
    with trio.fail_after(limit_s):
        frame = json.loads(await ws.get_message())
    assert isinstance(frame, dict)
    return frame


async def receive_until(
    ws: WebSocketConnection, predicate: Any, limit_s: float = 20.0
) -> list[dict[str, Any]]:
    """Frames received up to and including the first one ``predicate`` accepts."""
    frames = []
    with trio.fail_after(limit_s):
        while True:
            frame = json.loads(await ws.get_message())
            frames.append(frame)
            if predicate(frame):
                return frames


def turn_done(frame: dict[str, Any]) -> bool:
    return frame["event"] == "chat_history" and any(
        m["role"] == "assistant" and m.get("status") != "streaming" for m in frame["messages"]
    ) and frame.get("has_more") is False and len(frame["messages"]) <= 2


async def send(ws: WebSocketConnection, frame: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(frame))


async def eventually(check: Any, limit_s: float = 10.0) -> Any:
    """Polls ``check()`` (async) until it returns something truthy; fails after ``limit_s``."""
    with trio.fail_after(limit_s):
        while not (result := await check()):  # noqa: ASYNC110 - polling another process' state
            await trio.sleep(0.02)
    return result


async def close_transport(ws: WebSocketConnection) -> None:
    """Closes the TCP stream of a connection the server closed.

    trio-websocket 0.12 leaves it open when the server's close frame ends the connection
    while the client is still sending (its ``aclose`` returns early once a close reason is
    set), which ``filterwarnings = error`` reports as an unclosed socket.
    """
    await ws._stream.aclose()


@contextmanager
def server_in_thread(settings: Settings, upstream: Any = None) -> Iterator[Server]:
    """The real server on a trio loop of its own, in a thread: for blocking test clients
    (a browser driver, schemathesis). Stops (gracefully) when the block ends. With
    ``upstream`` (a fake OpenAI server's ``default`` behaviour), the server uses that fake
    server, started on the same loop, as its model."""
    started: dict[str, Server] = {}
    ready, stop = threading.Event(), threading.Event()

    async def run(s: Settings) -> None:
        async with running_server(s) as server:
            started["server"] = server
            ready.set()
            await trio.to_thread.run_sync(stop.wait)

    async def main() -> None:
        if upstream is None:
            await run(settings)
            return
        async with fake_openai_server(default=upstream) as fake:
            await run(settings.replace(provider="openai", openai_base_url=fake.base_url,
                                       openai_api_key="test-key", model="fake-model",
                                       max_retries=0))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(30), "the server did not start"
    try:
        yield started["server"]
    finally:
        stop.set()
        thread.join(30)
