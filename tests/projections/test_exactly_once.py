"""Exactly once: re-delivered events change nothing; a rebuild equals the live views."""

from __future__ import annotations

import random
from functools import partial

import trio

from app.config import Settings
from app.events.domain import ChatSession
from app.events.store import EventStore
from app.projections import Views, ViewUpdater, open_views, rebuild, status

from .conftest import dump, plain_turn, save_and_wait
from .workload import make_chats, random_turn


async def test_redelivered_events_change_nothing(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    chat = ChatSession.start(owner="alice")
    for i in range(5):
        plain_turn(chat, f"m{i}")
    position = await save_and_wait(store, views, chat)
    before = await trio.to_thread.run_sync(dump, views)
    again = await store.select(1, 1000)
    assert await trio.to_thread.run_sync(views.apply, again, store.app.mapper) == position
    assert await trio.to_thread.run_sync(views.apply, again[3:9], store.app.mapper) == position
    assert await trio.to_thread.run_sync(dump, views) == before
    assert runner.position == position and runner.lag == 0


async def test_rebuild_equals_live_views(settings: Settings) -> None:
    rng = random.Random(2024)
    store = EventStore.open(settings)
    views = open_views(settings)
    try:
        runner = ViewUpdater(settings, store, views, batch_size=7, poll_interval=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            chats = make_chats(rng, 6)
            for n in range(60):
                group = rng.sample(chats, rng.randint(1, 3))
                for chat in group:
                    random_turn(chat, rng, n)
                await save_and_wait(store, views, *group)
            nursery.cancel_scope.cancel()
        live = await trio.to_thread.run_sync(dump, views)
        assert len(live["messages"]) > 100
        alternatives = 0
        for chat in chats:  # the views read the active branch the aggregate answers from
            page, _ = await views.messages(chat.owner, chat.id, 1000)
            assert [m["seq"] for m in page] == chat.tree().path(chat.leaf)
            assert [m["content"] for m in page if m["role"] == "user"] == [
                m["content"] for m in chat.history if m["role"] == "user"]
            alternatives += sum(len(m["siblings"]) > 1 for m in page)
        assert alternatives > 5  # the workload branched
        assert {row[2] for row in live["usage"]} == {"m1", "m2"}  # as started, not "m-late"
    finally:
        views.close()
        store.close()
    for batch_size in (1, 2000):
        processed = await trio.to_thread.run_sync(partial(rebuild, settings, False, batch_size))
        assert processed == live["tracking"][0][1] or settings.store_kind == "postgres"
        rebuilt_views = open_views(settings)
        try:
            assert await trio.to_thread.run_sync(dump, rebuilt_views) == live
        finally:
            rebuilt_views.close()
    info = await trio.to_thread.run_sync(status, settings)
    assert info["lag"] == 0 and info["position"] == info["max_position"]


async def test_saves_gather_into_one_batch_unless_a_reader_waits(
    settings: Settings, store: EventStore, views: Views
) -> None:
    """After a save the runner waits ``projection_delay_ms`` for more (one batch for a
    burst), but a reader waiting for the views has them updated at once."""
    runner = ViewUpdater(settings.replace(projection_delay_ms=60_000), store, views,
                              poll_interval=60)
    batches: list[int] = []
    runner.observers.append(lambda events: batches.append(len(events)))
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        chats = [ChatSession.start(owner="alice") for _ in range(3)]
        for chat in chats:
            plain_turn(chat)
            await store.save(chat)  # three saves, three nudges
        await trio.sleep(0.3)
        assert batches == [] and runner.lag > 0  # gathering
        with trio.fail_after(2):
            assert await views.wait_for(store.last_saved, timeout=2)
        # one batch of every event saved: Started, the message, the response in four events
        assert batches == [3 * 6] and runner.lag == 0
        nursery.cancel_scope.cancel()
