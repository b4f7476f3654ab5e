"""eventchat in front of a real OpenAI-compatible server on loopback.

A turn through the ``openai`` provider end to end, an upstream failure reported in the
contract's shape, and the model's API key kept out of everything a client or an operator
can read: frames, events, views, stats, metrics, health and logs.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio

from tests.fakes.openai_server import ErrorReply, FakeToolCall, StreamReply, fake_openai_server

from .conftest import running_server, web_settings

SECRET = "sk-live-DO-NOT-LEAK-4242424242"


async def frames_of_turn(ws: Any) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with trio.fail_after(15):
        while not frames or frames[-1]["event"] != "chat_history":
            frames.append(json.loads(await ws.get_message()))
    return frames


async def test_a_turn_through_an_openai_compatible_server_never_shows_the_key(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with fake_openai_server(
        StreamReply([], tool_calls=[FakeToolCall("calculator", '{"expression": "6*7"}')]),
        StreamReply(["6*7 ", "is ", "42."]),
        ErrorReply(401, "bad key"),
    ) as upstream:
        s = web_settings(settings, provider="openai", openai_base_url=upstream.base_url,
                         openai_api_key=SECRET, model="fake-model", max_retries=0)
        async with running_server(s) as server:
            async with server.websocket() as ws:
                await ws.send_message(json.dumps({"message": "what is 6*7"}))
                first = await frames_of_turn(ws)
                chat_id = first[0]["chat_id"]
                await ws.send_message(json.dumps({"message": "again", "chat_id": chat_id}))
                second = await frames_of_turn(ws)
            async with server.client() as client, server.scraper() as scraper:
                readable = [
                    (await client.get(f"/chat/{chat_id}")).text,
                    (await client.get(f"/chat/{chat_id}/events")).text,
                    (await client.get("/stats")).text,
                    (await client.get("/chats")).text,
                    (await scraper.get("/metrics")).text,
                    (await client.get("/health")).text,
                ]
                page = (await client.get(f"/chat/{chat_id}")).json()

    done = next(f for f in first if f["event"] == "ai_response" and f["done"])
    assert done["message"] == "6*7 is 42." and done["status"] == "complete"
    tools = [f for f in first if f["event"] == "tool_activity"]
    assert [t["status"] for t in tools] == ["started", "completed"] and tools[1]["result"] == 42
    status = next(f for f in first if f["event"] == "backend_status")
    assert status["model"] == "fake-model" and status["completion_tokens"] > 0

    failed = next(f for f in second if f["event"] == "ai_response" and f["done"])
    assert failed["status"] == "failed"
    assert page["messages"][-1]["error"]["code"] == "model_request_refused"
    assert upstream.request_headers[0]["authorization"] == f"Bearer {SECRET}"

    everything = "\n".join(
        [json.dumps(first), json.dumps(second), *readable, caplog.text]
    )
    assert SECRET not in everything
    assert "DO-NOT-LEAK" not in everything
