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
