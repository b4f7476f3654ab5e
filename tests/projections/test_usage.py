"""The usage view: each user's tokens per UTC day and requested model, exactly once."""

from __future__ import annotations

from datetime import UTC, datetime

import trio

from app.events.domain import ChatSession
from app.events.store import EventStore
from app.projections import Views, ViewUpdater

from .conftest import dump, plain_turn, save_and_wait, timing, usage


async def test_usage_is_counted_per_user_day_and_requested_model(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    alice, bob = ChatSession.start(owner="alice"), ChatSession.start(owner="bob")
    plain_turn(alice, "one", model="small")
    plain_turn(alice, "two", model="small")
    alice.receive_message("three", model="large")
    rid = alice.start_response("large", "upstream-b")
    alice.complete_response(rid, "large-2026-01-01", "stop", usage(100, 20), timing())
    alice.receive_message("four")
    alice.start_response("large", "upstream-b")
    alice.interrupt_response("server_restarted")  # counted, with no tokens
    plain_turn(bob, "hi", model="small")
    position = await save_and_wait(store, views, alice, bob)

    today = datetime.now(UTC).date().isoformat()
    assert await views.usage("alice") == [
        {"day": today, "model": "large", "responses": 2, "prompt_tokens": 100,
         "completion_tokens": 20, "total_tokens": 120},
        {"day": today, "model": "small", "responses": 2, "prompt_tokens": 20,
         "completion_tokens": 10, "total_tokens": 30},
    ]
    assert [row["total_tokens"] for row in await views.usage("bob")] == [15]
    assert await views.usage("alice", since="9999-01-01") == []

    before = await trio.to_thread.run_sync(dump, views)
    again = await store.select(1, 1000)
    assert await trio.to_thread.run_sync(views.apply, again, store.app.mapper) == position
    assert await trio.to_thread.run_sync(dump, views) == before
