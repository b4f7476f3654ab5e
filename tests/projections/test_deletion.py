"""A deleted chat leaves the views, and the views after it are those a rebuild gives."""

from __future__ import annotations

import trio

from app.events.domain import ChatSession
from app.events.store import EventStore
from app.projections import Views

from .conftest import dump, plain_turn


async def test_a_deleted_chat_leaves_the_views_as_a_rebuild_would(
    store: EventStore, views: Views
) -> None:
    gone, kept, other = (ChatSession.start("alice", "gone"), ChatSession.start("alice", "kept"),
                         ChatSession.start("bob", "other"))
    plain_turn(gone, "secret words", model="m1")
    plain_turn(gone, "what is 2+2", model="m2")
    plain_turn(kept, "kept words", model="m1")
    plain_turn(other, "bob's words")
    await store.save(gone, kept, other)
    gone.delete("alice")
    await store.save(gone)
    log = await store.select(1, 1000)
    # live: the chat's events and its deletion in one batch (its key not yet destroyed)
    skipped_before = views.skipped
    await trio.to_thread.run_sync(views.apply, log, store.app.mapper)
    live = await trio.to_thread.run_sync(dump, views)
    await store.destroy_key(gone.id)
    # a rebuild: its events cannot be read any more, and are passed over without a fault
    await trio.to_thread.run_sync(views.reset)
    await trio.to_thread.run_sync(views.apply, log, store.app.mapper)
    rebuilt = await trio.to_thread.run_sync(dump, views)
    assert views.skipped == skipped_before and (await views.skipped_events())[0] == 0
    live.pop("usage"), rebuilt.pop("usage")  # (budgets keep a deleted chat's tokens)
    assert live == rebuilt
    text = repr(live)
    assert str(gone.id) not in text and "secret words" not in text and "m2" not in text
    assert "kept words" in text and "bob's words" in text
    totals = (await views.stats("alice"))["totals"]
    assert totals["chats"] == 1 and totals["messages"] == 2 and totals["responses"] == 1
    assert (await views.stats())["totals"]["chats"] == 2
