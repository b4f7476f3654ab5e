"""Faults a user meets in five minutes: a stop right after a message, a long reply on a
nearly full disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from tests.conftest import base_settings

from .conftest import Server, receive_until, running_server, send, web_settings


def ended(frame: dict[str, Any]) -> bool:
    return frame["event"] == "ai_response" and frame["done"]


async def test_a_stop_right_after_a_message_stops_its_answer(server: Server) -> None:
    """In a chat whose actor is not running yet, and in one whose actor runs."""
    async with server.client() as c:
        chats = [(await c.post("/chat", json={})).json()["id"] for _ in range(5)]
    async with server.websocket() as ws:
        for i, chat_id in enumerate(chats + chats):
            await ws.send_message(json.dumps({"message": "/slow", "chat_id": chat_id,
                                              "client_message_id": f"m{i}"}))
            await send(ws, {"event": "stop", "chat_id": chat_id})
            frames = await receive_until(ws, ended)
            assert [f for f in frames if f["event"] == "error"] == []
            assert frames[0]["event"] == "ack" and frames[-1]["status"] == "stopped", frames[-1]
            await receive_until(ws, lambda f: f["event"] == "chat_history")
    async with server.client() as c:
        for chat_id in chats:
            page = (await c.get(f"/chat/{chat_id}")).json()
            statuses = [m["status"] for m in page["messages"] if m["role"] == "assistant"]
            assert statuses == ["stopped", "stopped"]


async def test_a_long_reply_needs_little_write_ahead_log_on_sqlite(tmp_path: Path) -> None:
    """A 20 KB reply once needed 3 MB of SQLite WAL (a full disk met early); the WAL files
    now stay under 1.5 MB together, sampled all through the reply."""
    settings = base_settings(tmp_path / "data")
    data = settings.data_dir
    wals = [data / "events.sqlite-wal", data / "views.sqlite-wal"]
    peak = 0
    async with running_server(web_settings(settings, token_flush_ms=60)) as server:
        async with trio.open_nursery() as nursery:

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, sum(p.stat().st_size for p in wals if p.exists()))
                    await trio.sleep(0.01)

            nursery.start_soon(sample)
            async with server.client() as c:
                r = await c.post("/generate", json={"message": "/tokens 3400"}, timeout=60)
            nursery.cancel_scope.cancel()
    assert len(r.json()["message"]["content"]) > 20_000
    assert 0 < peak < 1_500_000, peak
