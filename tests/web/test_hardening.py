"""Bad input and hostile users, on real servers and both stores: every refusal is the
contract's error, nothing is left behind, and nobody else's service suffers."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import httpx
import psycopg
import pytest
import trio

from app.events.application import ChatApplication
from app.storage.recorder import persistence_env
from tests.fakes.openai_server import FakeToolCall, StreamReply, fake_openai_server
from tests.projections.test_poison import poisoned_chat

from .conftest import (
    Server,
    eventually,
    receive,
    receive_until,
    running_server,
    send,
    turn_done,
    web_settings,
)
from .test_ws import handshake

NUL, LONE = "x\u0000y", "x \ud800"
CHAT = "3f7b1b42-1c8e-4f6a-9a53-2f1d2b3c4d5e"


def raw_json(value: dict[str, Any]) -> bytes:
    """JSON as a hostile client writes it: lone surrogates as ``\\udXXX`` escapes."""
    return json.dumps(value).encode()


async def post(c: httpx.AsyncClient, path: str, body: bytes) -> httpx.Response:
    return await c.post(path, content=body, headers={"content-type": "application/json"})


def assert_refused(r: httpx.Response, status: int = 400, code: str = "invalid_request") -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


async def assert_service_goes_on(server: Server) -> None:
    """Another user can still create a chat, see it listed and talk in it."""
    async with server.client("bob") as c:
        chat = (await c.post("/chat", json={"title": "still fine"})).json()
        assert [x["id"] for x in (await c.get("/chats")).json()["chats"]][0] == chat["id"]
        answer = await c.post("/generate", json={"message": "hello", "chat_id": chat["id"]})
        assert answer.json()["message"]["status"] == "complete"


async def test_nul_and_lone_surrogates_are_refused_in_every_text_field(server: Server) -> None:
    async with server.client() as c:
        chat_id = (await c.post("/chat", json={})).json()["id"]
        for bad in (NUL, LONE):
            for field in ("title", "model", "system_prompt"):
                assert_refused(await post(c, "/chat", raw_json({field: bad})))
            for body in ({"message": bad}, {"message": bad, "chat_id": chat_id},
                         {"message": "hi", "client_message_id": bad},
                         {"message": bad, "stream": True}):
                assert_refused(await post(c, "/generate", raw_json(body)))
        for query in ({"q": NUL}, {"cursor": NUL}):
            assert_refused(await c.get("/chats", params=query))
        for url in ("/chats?q=x%ED%A0%80", "/chats?cursor=x%ED%A0%80"):  # no UTF-8 for it
            assert (await c.get(url)).status_code in (200, 400)
        chats = (await c.get("/chats")).json()["chats"]
        assert [x["id"] for x in chats] == [chat_id]  # nothing else was created
        assert (await c.get(f"/chat/{chat_id}")).json()["messages"] == []
    async with server.websocket() as ws:
        for frame in ({"message": LONE}, {"message": NUL},
                      {"message": "hi", "client_message_id": NUL},
                      {"message": LONE, "chat_id": chat_id}):
            await ws.send_message(json.dumps(frame))  # escapes, as a browser would send them
            error = await receive(ws)
            assert error["event"] == "error" and error["code"] == "invalid_request", error
        await send(ws, {"message": "and now a good one", "chat_id": chat_id})
        assert (await receive(ws))["event"] == "ack"
    async with server.client() as c:
        assert len((await c.get("/chats")).json()["chats"]) == 1  # no empty chat left behind
    await assert_service_goes_on(server)


async def test_model_output_with_nul_and_lone_surrogates_is_cleaned_and_recorded(
    settings: Any,
) -> None:
    async with fake_openai_server(
        StreamReply([], tool_calls=[FakeToolCall("calculator",
                                                 '{"expression": "1+\\u0000", "k\\ud800": 1}',
                                                 call_id="call\u0000one")]),
        StreamReply(["a\u0000b", " c\ud800d"]),
    ) as upstream:
        s = web_settings(settings, provider="openai", openai_base_url=upstream.base_url,
                         model="fake-model", max_retries=0)
        async with running_server(s) as server:
            async with server.websocket() as ws:
                await send(ws, {"message": "what is 1+1"})
                frames = await receive_until(ws, turn_done)
            end = next(f for f in frames if f["event"] == "ai_response" and f["done"])
            assert end["status"] == "complete" and end["message"] == "a\ufffdb c\ufffdd"
            deltas = "".join(f["delta"] for f in frames
                             if f["event"] == "ai_response" and not f["done"])
            assert deltas == end["message"]  # what was shown is what was recorded
            async with server.client() as c:
                page = (await c.get(f"/chat/{end['chat_id']}")).json()
            answer = page["messages"][-1]
            assert answer["content"] == "a\ufffdb c\ufffdd"
            call = answer["tool_calls"][0]
            assert call["arguments"] == {"expression": "1+\ufffd", "k\ufffd": 1}
            assert call["error"]  # the calculator refused it; the turn went on
            await assert_service_goes_on(server)


@pytest.mark.parametrize("body", [
    b'{"title": "\xff\xfe"}',                        # not UTF-8
    b"[" * 30_000 + b"]" * 30_000,                    # nested beyond the parser's stack
    b'{"title": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    b'{"title": ',                                    # not JSON
])
async def test_malformed_bodies_are_400(server: Server, body: bytes) -> None:
    async with server.client() as c:
        for path in ("/chat", "/generate"):
            assert_refused(await post(c, path, body), code="invalid_json")
        assert (await c.get("/chats")).json()["chats"] == []


async def test_out_of_range_and_undecodable_queries_are_400_not_500(server: Server) -> None:
    evil_cursor = base64.urlsafe_b64encode(b'["\\ud800", "\\u0000"]').decode()
    async with server.client() as c:
        chat_id = (await c.post("/chat", json={})).json()["id"]
        for path, params in [
            (f"/chat/{chat_id}", {"before_seq": 2**63}),
            (f"/chat/{chat_id}", {"before_seq": 2**31}),
            (f"/chat/{chat_id}/events", {"after_seq": 2**63}),
            ("/chats", {"q": "a\u0000b"}),
            ("/chats", {"cursor": "\u0000"}),
        ]:
            assert_refused(await c.get(path, params=params))
        r = await c.get("/chats", params={"cursor": evil_cursor})  # a cursor it did not make
        assert r.status_code == 200 and r.json()["chats"][0]["id"] == chat_id


async def test_hostile_frames_get_error_frames_and_the_connection_stays(server: Server) -> None:
    async with server.client() as c:
        chat_id = (await c.post("/chat", json={})).json()["id"]
    async with server.websocket() as ws:
        await ws.send_message("[" * 30_000 + "]" * 30_000)
        assert (await receive(ws))["code"] == "invalid_json"
        await ws.send_message('{"event": "subscribe", "chat_id": "' + chat_id + '", "x": '
                              + "[" * 30_000 + "]" * 30_000 + "}")
        assert (await receive(ws))["code"] == "invalid_json"
        await send(ws, {"event": "subscribe", "chat_id": chat_id, "after_seq": 2**63})
        error = await receive(ws)
        assert error["event"] == "error" and error["code"] == "invalid_request"
        await ws.send_message(b"\xff\xfe{")
        assert (await receive(ws))["code"] == "invalid_json"
        for empty in (b"", ""):  # Quart hands an empty binary frame over as None
            await ws.send_message(empty)
            assert (await receive(ws))["code"] == "invalid_json"
        await send(ws, {"event": "subscribe", "chat_id": chat_id})
        assert (await receive(ws))["event"] == "chat_history"


async def test_every_client_file_carries_the_security_headers(server: Server) -> None:
    async with server.client(None) as c:
        for path in ("/", "/static/index.html", "/static/app.js"):
            r = await c.get(path)
            assert r.status_code == 200, path
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
            assert r.headers["x-content-type-options"] == "nosniff", path
            assert r.headers["referrer-policy"] == "no-referrer", path


async def test_chat_creation_is_limited_per_user(settings: Any) -> None:
    async with running_server(web_settings(settings, chats_per_hour=2)) as server:
        async with server.client() as c:
            for _ in range(2):
                assert (await c.post("/chat", json={})).status_code == 201
            r = await c.post("/chat", json={"system_prompt": "x" * 30_000})
            assert_refused(r, 429, "rate_limited")
            assert int(r.headers["retry-after"]) > 60
            assert_refused(await c.post("/generate", json={"message": "hi"}), 429, "rate_limited")
        async with server.websocket() as ws:
            await send(ws, {"message": "a new chat, please", "client_message_id": "m1"})
            error = await receive(ws)
            assert error["code"] == "rate_limited" and error["client_message_id"] == "m1"
        async with server.client() as c:
            assert len((await c.get("/chats")).json()["chats"]) == 2
        async with server.client("bob") as c:
            assert (await c.post("/chat", json={})).status_code == 201


async def test_websocket_connections_are_limited_per_user(settings: Any) -> None:
    async with running_server(web_settings(settings, ws_connections_per_user=2)) as server:
        async with server.websocket() as first, server.websocket():
            upgrade = {"Connection": "Upgrade", "Upgrade": "websocket",
                       "Sec-WebSocket-Version": "13",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            async with server.client() as c:
                refused = await c.get("/ws/chat", headers=upgrade)
            assert_refused(refused, 429, "rate_limited")
            async with server.websocket("bob") as other:  # another user is not affected
                await send(other, {"message": "hi"})
                assert (await receive(other))["event"] == "ack"
            await first.aclose()
        token = server.tokens["alice"]
        assert await handshake(server, f"/ws/chat?access_token={token}", {}) == 101


async def test_followed_chats_are_limited_per_connection(settings: Any) -> None:
    async with running_server(web_settings(settings, follows_per_connection=2)) as server:
        async with server.client() as c:
            chats = [(await c.post("/chat", json={})).json()["id"] for _ in range(3)]
        async with server.websocket() as ws:
            for chat_id in chats[:2]:
                await send(ws, {"event": "subscribe", "chat_id": chat_id})
                assert (await receive(ws))["event"] == "chat_history"
            await send(ws, {"event": "subscribe", "chat_id": chats[2]})
            assert (await receive(ws))["code"] == "rate_limited"
            await send(ws, {"message": "in a new chat"})
            assert (await receive(ws))["code"] == "rate_limited"
            await send(ws, {"event": "subscribe", "chat_id": chats[0]})  # again: no new follow
            assert (await receive(ws))["event"] == "chat_history"
            await send(ws, {"event": "unsubscribe", "chat_id": chats[1]})
            await send(ws, {"event": "subscribe", "chat_id": chats[2]})
            assert (await receive(ws))["event"] == "chat_history"
        async with server.client() as c:
            assert len((await c.get("/chats")).json()["chats"]) == 3


async def test_the_origin_check_compares_scheme_host_and_port(settings: Any) -> None:
    listed = web_settings(settings, allowed_origins=("https://app.example",))
    async with running_server(listed) as server:
        bearer = server.headers()
        port = server.base_url.rsplit(":", 1)[1]
        for origin, status in [
            (server.base_url, 101),
            (server.base_url.replace("http://", "https://"), 403),   # same host, other scheme
            (f"http://127.0.0.1:{int(port) + 1}", 403),              # same host, other port
            ("https://app.example", 101),
            ("https://app.example:443", 101),
            ("http://app.example", 403),
            ("https://app.example:8443", 403),
            ("null", 403),
        ]:
            assert await handshake(server, "/ws/chat", {**bearer, "Origin": origin}) == status, \
                origin


async def test_the_server_answers_health_quickly_during_hostile_traffic(server: Server) -> None:
    """Many malformed requests at once: the loop stays free for others."""
    async with server.client() as c:

        async def hostile() -> None:
            await post(c, "/chat", b"[" * 30_000 + b"]" * 30_000)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(hostile)
        assert (await c.get("/health")).status_code == 200
    await eventually(lambda: _ok(server))


async def _ok(server: Server) -> bool:
    async with server.client(None) as c:
        return (await c.get("/health")).json()["status"] == "ok"


def _save_directly(settings: Any, *chats: Any) -> None:
    app = ChatApplication(env=persistence_env(settings))
    try:
        app.save(*chats)
    finally:
        app.close()


@contextmanager
def views_writer_held(settings: Any) -> Iterator[None]:
    """Holds the views' write lock from another connection, as a stuck database would."""
    if settings.database_url:
        with psycopg.connect(settings.database_url) as conn:
            conn.execute(f'SET search_path TO "{settings.database_schema}"')
            conn.execute("SELECT position FROM view_tracking FOR UPDATE")
            yield
            conn.rollback()
    else:
        conn = sqlite3.connect(settings.data_dir / "views.sqlite", isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()


async def test_health_reports_skipped_events_and_views_that_cannot_advance(
    settings: Any,
) -> None:
    s = web_settings(settings, projection_stall_s=0.3)
    await trio.to_thread.run_sync(_save_directly, s, poisoned_chat())
    async with running_server(s) as server, server.client(None) as c:
        health = (await c.get("/health")).json()
        assert health["status"] == "degraded" and health["skipped_events"] == 1
        assert health["protocol"] == "1.1"
        assert (await c.get("/health")).status_code == 200  # degraded, but serving
        release = trio.Event()
        held = trio.Event()

        def hold() -> None:
            with views_writer_held(s):
                trio.from_thread.run_sync(held.set)
                trio.from_thread.run(release.wait)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, hold, abandon_on_cancel=False))
            await held.wait()
            async with server.client() as alice:
                answer = await alice.post("/generate", json={"message": "hello"})
                assert answer.json()["message"]["status"] == "complete"
            stalled = await eventually(lambda: _status(c, 503))
            assert stalled["status"] == "degraded"
            assert any("not advanced" in p for p in stalled["problems"]), stalled
            release.set()
        recovered = await eventually(lambda: _status(c, 200, projection_lag=0))
        assert recovered["status"] == "degraded" and recovered["skipped_events"] == 1


async def _status(c: httpx.AsyncClient, code: int, **expected: Any) -> dict[str, Any] | None:
    r = await c.get("/health")
    body = r.json()
    matches = r.status_code == code and all(body.get(k) == v for k, v in expected.items())
    return body if matches else None
