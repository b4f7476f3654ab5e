"""Several models: ``GET /models``, a model per chat and per turn, each turn served by the
upstream of its model, recorded in the events and split in the stats and the usage."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from app.config import Upstream
from tests.fakes.openai_server import StreamReply, echo_reply, fake_openai_server

from .conftest import receive_until, running_server, send, turn_done, web_settings


def answered_as_asked(body: dict[str, Any]) -> StreamReply:
    """Echoes the message, saying it is the model that was asked for (as servers do)."""
    return dataclasses.replace(echo_reply(body), model=body["model"])


def asked(upstream: Any) -> list[tuple[str, str]]:
    """(model, last user message) of every request the upstream received."""
    return [(r["model"], [m for m in r["messages"] if m["role"] == "user"][-1]["content"])
            for r in upstream.requests]


async def test_one_chat_uses_two_upstreams_turn_by_turn(settings: Any) -> None:
    async with fake_openai_server(default=answered_as_asked) as alpha, \
            fake_openai_server(default=answered_as_asked) as beta:
        s = web_settings(settings, model="alpha-1", max_retries=0, upstreams=(
            Upstream("alpha", "openai", ("alpha-1", "alpha-2"), alpha.base_url),
            Upstream("beta", "openai", ("beta-1",), beta.base_url),
        ))
        async with running_server(s) as server, server.client() as c:
            listed = (await c.get("/models")).json()
            refused = await c.post("/chat", json={"model": "gamma-1"})
            chat = (await c.post("/chat", json={"model": "beta-1"})).json()
            chat_id = chat["id"]

            one = await c.post("/generate", json={"chat_id": chat_id, "message": "one"})
            async with server.websocket() as ws:
                await send(ws, {"chat_id": chat_id, "message": "two", "model": "alpha-2"})
                await receive_until(ws, turn_done)
                # refused before anything is recorded, over both ways of sending
                await send(ws, {"chat_id": chat_id, "message": "x", "model": "gamma-1"})
                error = (await receive_until(ws, lambda f: f["event"] == "error"))[-1]
                bad_turn = await c.post("/generate", json={"chat_id": chat_id, "message": "x",
                                                           "model": "gamma-1"})
                three = await c.post("/generate", json={"chat_id": chat_id, "message": "three",
                                                        "model": "alpha-1"})
                # two at once: the second waits for the first, then runs with its own model
                await send(ws, {"chat_id": chat_id, "message": "four", "model": "alpha-2"})
                await send(ws, {"chat_id": chat_id, "message": "five"})
                await receive_until(ws, lambda f: f["event"] == "ai_response" and f["done"]
                                    and f["message"] == "You said: five")
            events = (await c.get(f"/chat/{chat_id}/events")).json()["events"]
            stats = (await c.get("/stats")).json()["models"]
            page = (await c.get(f"/chat/{chat_id}")).json()
            usage = (await c.get("/usage")).json()["usage"]

    assert listed == {"models": [
        {"id": "alpha-1", "provider": "alpha", "default": True},
        {"id": "alpha-2", "provider": "alpha", "default": False},
        {"id": "beta-1", "provider": "beta", "default": False},
    ]}
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unknown_model"
    assert error["code"] == "unknown_model" and error["chat_id"] == chat_id
    assert bad_turn.status_code == 400 and bad_turn.json()["error"]["code"] == "unknown_model"
    assert one.json()["message"]["model"] == "beta-1" and three.status_code == 200

    # each upstream received exactly its turns, asked for the turn's model
    assert asked(alpha) == [("alpha-2", "two"), ("alpha-1", "three"), ("alpha-2", "four")]
    assert asked(beta) == [("beta-1", "one"), ("beta-1", "five")]

    # the events say which model each message asked for and which upstream answered it
    received = [e["data"]["model"] for e in events if e["type"] == "MessageReceived"]
    started = [(e["data"]["model"], e["data"]["provider"])
               for e in events if e["type"] == "ResponseStarted"]
    assert received == [None, "alpha-2", "alpha-1", "alpha-2", None]
    assert started == [("beta-1", "beta"), ("alpha-2", "alpha"), ("alpha-1", "alpha"),
                       ("alpha-2", "alpha"), ("beta-1", "beta")]
    assert "x" not in [e["data"].get("text") for e in events]

    # the stats and the usage split responses and tokens by model, as the messages have them
    replies = [m for m in page["messages"] if m["role"] == "assistant"]
    assert [m["model"] for m in replies] == ["beta-1", "alpha-2", "alpha-1", "alpha-2", "beta-1"]
    tokens: dict[str, int] = {}
    for m in replies:
        assert m["status"] == "complete" and m["usage"]["total_tokens"] > 0
        tokens[m["model"]] = tokens.get(m["model"], 0) + m["usage"]["total_tokens"]
    assert {m: (v["responses"], v["total_tokens"]) for m, v in stats.items()} == {
        "beta-1": (2, tokens["beta-1"]), "alpha-2": (2, tokens["alpha-2"]),
        "alpha-1": (1, tokens["alpha-1"])}
    assert {(u["model"], u["responses"], u["total_tokens"]) for u in usage} == {
        ("beta-1", 2, tokens["beta-1"]), ("alpha-2", 2, tokens["alpha-2"]),
        ("alpha-1", 1, tokens["alpha-1"])}
    assert "gamma-1" not in json.dumps(page)
