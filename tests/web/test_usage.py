"""What the views show of a reply's usage: estimated counts marked, server timings kept,
through every way a client reads a message, on both stores."""

from __future__ import annotations

import json
from typing import Any

import trio

from app.projections import rebuild
from tests.fakes.openai_server import StreamReply, fake_openai_server

from .conftest import receive_until, running_server, send, turn_done, web_settings

TIMINGS = {"prompt_n": 12, "prompt_ms": 8.5, "predicted_n": 3, "predicted_ms": 21.0}


async def test_estimated_usage_and_server_timings_reach_every_view(settings: Any) -> None:
    async with fake_openai_server(
        StreamReply(["Hel", "lo"], usage=False),
        StreamReply(["Hi ", "there"], extra={"timings": TIMINGS}),
    ) as upstream:
        s = web_settings(settings, provider="openai", openai_base_url=upstream.base_url,
                         model="fake-model", max_retries=0)
        async with running_server(s) as server:
            async with server.client() as c:
                first = (await c.post("/generate", json={"message": "hello"})).json()
                chat_id = first["chat_id"]
            assert first["message"]["usage"]["estimated"] is True
            async with server.websocket() as ws:
                await send(ws, {"message": "again", "chat_id": chat_id})
                frames = await receive_until(ws, turn_done)
            live = [f for f in frames if f["event"] == "chat_history"][-1]["messages"][-1]
            assert live["usage"]["server_timings"] == {"timings": TIMINGS}
            assert "estimated" not in live["usage"]
            async with server.client() as c:
                page = (await c.get(f"/chat/{chat_id}")).json()
        answers = [m for m in page["messages"] if m["role"] == "assistant"]
        assert answers[0]["usage"]["estimated"] is True
        assert answers[1]["usage"]["server_timings"] == {"timings": TIMINGS}
        assert answers[1]["usage"] == live["usage"]  # the live rows equal the views
        await rebuild_and_compare(s, chat_id, page)


async def rebuild_and_compare(settings: Any, chat_id: str, page: dict[str, Any]) -> None:


    await trio.to_thread.run_sync(rebuild, settings, False)
    async with running_server(settings) as server, server.client() as c:
        again = (await c.get(f"/chat/{chat_id}")).json()
    assert json.dumps(again["messages"], sort_keys=True) == json.dumps(page["messages"],
                                                                       sort_keys=True)


async def test_max_tokens_goes_upstream_and_a_cut_reply_is_complete_with_length(
    settings: Any,
) -> None:
    async with fake_openai_server(
        StreamReply(["one ", "two ", "three"], finish_reason="length"),
        StreamReply(["fine"]),
    ) as upstream:
        s = web_settings(settings, provider="openai", openai_base_url=upstream.base_url,
                         model="fake-model", max_retries=0, max_tokens=11)
        async with running_server(s) as server, server.client() as c:
            assert (await c.post("/chat", json={"max_tokens": 0})).status_code == 400
            capped = (await c.post("/chat", json={"max_tokens": 3})).json()["id"]
            async with server.websocket() as ws:
                await send(ws, {"message": "count", "chat_id": capped})
                frames = await receive_until(ws, turn_done)
            end = next(f for f in frames if f["event"] == "ai_response" and f["done"])
            assert end["status"] == "complete" and end["finish_reason"] == "length"
            await c.post("/generate", json={"message": "hello"})  # a chat without its own
        assert [r["max_tokens"] for r in upstream.requests] == [3, 11]


async def test_the_offline_model_stops_at_max_tokens(server: Any) -> None:
    async with server.client() as c:
        chat_id = (await c.post("/chat", json={"max_tokens": 5})).json()["id"]
        answer = (await c.post("/generate", json={"message": "/tokens 50",
                                                   "chat_id": chat_id})).json()["message"]
    assert answer["status"] == "complete" and answer["content"] == "lorem ipsum dolor sit amet"
    assert answer["usage"]["completion_tokens"] == 5


async def test_no_tokens_are_counted_for_nothing(settings: Any) -> None:
    """An empty reply counts no completion token; a request the server refused before the
    model read it counts no prompt token."""
    from tests.fakes.openai_server import ErrorReply

    async with fake_openai_server(StreamReply([], usage=False),
                                  ErrorReply(400, "bad request")) as upstream:
        s = web_settings(settings, provider="openai", openai_base_url=upstream.base_url,
                         model="fake-model", max_retries=0)
        async with running_server(s) as server, server.client() as c:
            empty = (await c.post("/generate", json={"message": "say nothing"})).json()
            refused = (await c.post("/generate", json={"message": "hello"})).json()
    assert empty["message"]["usage"]["completion_tokens"] == 0
    assert empty["message"]["usage"]["prompt_tokens"] > 0
    assert refused["message"]["status"] == "failed"
    assert refused["message"]["usage"]["prompt_tokens"] == 0
    assert refused["message"]["usage"]["total_tokens"] == 0
