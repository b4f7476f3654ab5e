"""Faults a user meets in five minutes: a stop right after a message, on both stores."""

from __future__ import annotations

import json
from typing import Any

from .conftest import Server, receive_until, send


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
