"""Real servers on one PostgreSQL surviving the loss of their dedicated connections."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
import pytest
import trio

from app.config import Settings
from app.events.store import EventStore

from ..actors.faults import kill_lease_holder, kill_listeners
from .conftest import receive, receive_until, running_server, send, web_settings


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


def lorem(tokens: int) -> str:
    """The offline model's reply to ``/tokens N``."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


def done(frame: dict[str, Any]) -> bool:
    return frame["event"] == "ai_response" and frame["done"]


def rebuilt(frames: list[dict[str, Any]]) -> str:
    """A reply rebuilt from its deltas by offset; fails on a gap or a doubled character."""
    text = ""
    for f in frames:
        if f["event"] == "ai_response" and not f["done"]:
            assert f["offset"] == len(text), (f["offset"], len(text))
            text += f["delta"]
    return text


async def stored_replies(settings: Settings, chat_id: str) -> list[str]:
    store = await trio.to_thread.run_sync(EventStore.open, settings)
    try:
        chat = await store.get(UUID(chat_id))
    finally:
        store.close()
    return [m["content"] for m in chat.history if m["role"] == "assistant"]


async def listening_again(settings: Settings, pg_url: str, count: int) -> float:
    """Seconds until ``count`` servers LISTEN on the schema's channel again."""
    started = trio.current_time()
    with trio.fail_after(5):
        while True:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                (found,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s",
                    (f'LISTEN "eventchat_{settings.database_schema}"',),
                ).fetchone() or (0,)
            if found >= count:
                return trio.current_time() - started
            await trio.sleep(0.02)


async def test_one_server_goes_on_after_losing_its_listen_connection(
    settings: Settings, pg_url: str
) -> None:
    s = web_settings(settings, offline_token_delay_s=0.01)
    async with running_server(s) as server, server.websocket() as ws:
        await send(ws, {"message": "/tokens 150", "client_message_id": "long"})
        ack = await receive(ws)
        first = await receive(ws)
        assert first["event"] == "ai_response"
        assert len(await trio.to_thread.run_sync(kill_listeners, pg_url, s.database_schema)) == 1
        recovered_s = await listening_again(s, pg_url, 1)
        # a message sent meanwhile is acknowledged and answered in its turn
        await send(ws, {"message": "/tokens 5", "chat_id": ack["chat_id"],
                        "client_message_id": "meanwhile"})
        frames = [first, *await receive_until(ws, done, limit_s=10)]
        assert frames[-1]["status"] == "complete"
        assert rebuilt(frames) == frames[-1]["message"] == lorem(150)
        assert any(f["event"] == "ack" and f["client_message_id"] == "meanwhile" for f in frames)
        second = await receive_until(ws, done, limit_s=10)
        assert second[-1]["status"] == "complete" and second[-1]["message"] == lorem(5)
        with trio.fail_after(5):
            async with server.client() as c:
                r = await c.post("/generate", json={"message": "still there?"})
        assert r.status_code == 200, r.text
    print(f"one server: listening again {recovered_s:.2f} s after the kill")


async def test_two_servers_go_on_after_losing_their_listen_connections(
    settings: Settings, pg_url: str
) -> None:
    s = web_settings(settings, offline_token_delay_s=0.01)
    async with running_server(s) as one, running_server(s) as two:
        async with one.websocket() as driver, two.websocket() as follower:
            await send(driver, {"message": "/tokens 200", "client_message_id": "long"})
            ack = await receive(driver)
            chat_id = ack["chat_id"]
            await send(follower, {"event": "subscribe", "chat_id": chat_id})
            seen = [await receive(follower) for _ in range(3)]  # history, text so far, more
            killed = await trio.to_thread.run_sync(kill_listeners, pg_url, s.database_schema)
            assert len(killed) == 2
            recovered_s = await listening_again(s, pg_url, 2)
            seen += await receive_until(follower, done, limit_s=10)
            driven = await receive_until(driver, done, limit_s=10)
            assert seen[0]["event"] == "chat_history"
            assert rebuilt(seen) == seen[-1]["message"] == driven[-1]["message"] == lorem(200)

            # the follower's server records a message; the owner answers it
            await send(follower, {"message": "/tokens 7", "chat_id": chat_id,
                                  "client_message_id": "after"})
            answered = await receive_until(follower, done, limit_s=5)
            assert any(f["event"] == "ack" for f in answered)
            assert answered[-1]["status"] == "complete" and answered[-1]["message"] == lorem(7)
    assert await stored_replies(s, chat_id) == [lorem(200), lorem(7)]
    print(f"two servers: both listening again {recovered_s:.2f} s after the kill")


async def test_a_server_that_loses_its_lease_connection_stops_writing_and_says_so(
    settings: Settings, pg_url: str
) -> None:
    """The split brain: the owner's lease vanishes with its connection while it streams."""
    s = web_settings(settings, offline_token_delay_s=0.05, lease_check_interval_s=0.2)
    async with running_server(s) as one, running_server(s) as two:
        async with one.websocket() as driver, two.websocket() as follower:
            await send(driver, {"message": "/tokens 60", "client_message_id": "first"})
            ack = await receive(driver)
            chat_id = ack["chat_id"]
            # the other server follows the chat: it tries the lease every 2 s
            await send(follower, {"event": "subscribe", "chat_id": chat_id})
            assert (await receive(follower))["event"] == "chat_history"
            await receive_until(driver, lambda f: len(f.get("delta", "")) > 0)
            await trio.sleep(0.5)
            killed = await trio.to_thread.run_sync(kill_lease_holder, pg_url, UUID(chat_id))
            assert len(killed) == 1
            killed_at = trio.current_time()
            # the losing server's client is told: the reply ends, as interrupted
            told = await receive_until(driver, done, limit_s=5)
            told_s = trio.current_time() - killed_at
            assert told[-1]["status"] == "interrupted"
            history = await receive_until(driver, lambda f: f["event"] == "chat_history")
            stored_first = history[-1]["messages"][-1]
            assert stored_first["status"] == "interrupted"

            # the next message, through the other server, is answered by one writer
            await send(follower, {"message": "/tokens 60", "chat_id": chat_id,
                                  "client_message_id": "second"})
            answered = await receive_until(follower, lambda f: done(f) and f["seq"] > ack["seq"]
                                           and f["status"] != "interrupted", limit_s=10)
            assert answered[-1]["status"] == "complete"
            await trio.sleep(0.5)  # a second writer, if any, would have written by now
    replies = await stored_replies(s, chat_id)
    assert len(replies) == 2
    assert replies[0] and lorem(60).startswith(replies[0]), replies[0]
    assert replies[0] == stored_first["content"]
    assert replies[1] == lorem(60), (len(replies[1]), len(lorem(60)))
    print(f"lease connection lost: the owner's client told after {told_s:.2f} s; stored "
          f"replies {len(replies[0])} characters (cut short, of {len(lorem(60))}) and "
          f"{len(replies[1])}")
