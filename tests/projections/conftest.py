"""Fixtures of the projection tests: a real store and views on each backend, and turns."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

from app.config import Settings
from app.events.domain import ChatSession
from app.events.store import EventStore
from app.projections import Views, ViewUpdater, open_views


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    store = EventStore.open(settings)
    yield store
    store.close()


@pytest.fixture
def views(settings: Settings) -> Iterator[Views]:
    views = open_views(settings)
    yield views
    views.close()


@pytest.fixture
async def runner(
    settings: Settings, store: EventStore, views: Views
) -> AsyncIterator[ViewUpdater]:
    runner = ViewUpdater(settings, store, views, poll_interval=0.05)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(runner.run)
        yield runner
        nursery.cancel_scope.cancel()


def usage(prompt: int = 10, completion: int = 5) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def timing(ttft: float = 80.0, duration: float = 900.0, tps: float = 40.0) -> dict[str, Any]:
    return {"ttft_ms": ttft, "duration_ms": duration, "tokens_per_second": tps}


def plain_turn(chat: ChatSession, text: str = "hi", reply: tuple[str, ...] = ("Hel", "lo"),
               client_message_id: str | None = None, model: str = "offline") -> str:
    chat.receive_message(text, client_message_id)
    rid = chat.start_response(model, "offline")
    for part in reply:
        chat.record_tokens(rid, part, 1)
    chat.complete_response(rid, model, "stop", usage(), timing())
    return rid


async def save_and_wait(store: EventStore, views: Views, *chats: ChatSession) -> int:
    recordings = await store.save(*chats)
    position = max(r.notification.id for r in recordings)
    with trio.fail_after(10):
        assert await views.wait_for(position, timeout=5)
    return position


def dump(views: Views) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every view, in a stable order (blocking)."""
    queries = {
        "tracking": "SELECT name, position FROM view_tracking ORDER BY name",
        "chats": "SELECT * FROM view_chats ORDER BY chat_id",
        "messages": "SELECT * FROM view_messages ORDER BY chat_id, seq",
        "counters": "SELECT scope, name, value FROM view_counters ORDER BY scope, name",
        "sketches": "SELECT scope, metric, bucket, count FROM view_sketches"
        " ORDER BY scope, metric, bucket",
        "search": "SELECT content, owner, chat_id, seq, role FROM view_search"
        " ORDER BY chat_id, seq, role",
        "usage": "SELECT * FROM view_usage ORDER BY owner, day, model",
    }
    with views.db.read() as tx:
        return {name: [tuple(row) for row in tx.all(sql)] for name, sql in queries.items()}
