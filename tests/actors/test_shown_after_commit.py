"""Guarantee 8 with slow commits: no follower, here or in another process sharing
PostgreSQL, ever holds text that the log does not hold yet."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import trio

from app.actors import ActorSystem, TokenDelta
from app.events.domain import ChatSession

from .conftest import ScriptedProvider

#: How long each transaction that writes events stays open after its inserts.
COMMIT_DELAY_S = 0.04


def slow_commits(system: ActorSystem) -> None:
    """Every save of ``system`` waits ``COMMIT_DELAY_S`` inside its transaction, after its
    events are inserted and before they commit."""
    recorder: Any = system.store.app.recorder
    insert = recorder._insert_events

    def insert_then_wait(*args: Any, **kwargs: Any) -> Any:
        result = insert(*args, **kwargs)
        time.sleep(COMMIT_DELAY_S)
        return result

    recorder._insert_events = insert_then_wait


async def committed_text(system: ActorSystem, chat_id: UUID, response_id: str) -> str:
    """The response's text as the log holds it now (committed rows only)."""
    events = await system.store.run(lambda: list(system.store.app.events.get(chat_id)))
    return "".join(e.text for e in events
                   if isinstance(e, ChatSession.TokensGenerated) and e.response_id == response_id)


async def follow(system: ActorSystem, chat_id: UUID, reader: ActorSystem,
                 seen: list[str]) -> None:
    """Follows the chat's next reply on ``system``; at every delta, checks with ``reader``
    that the log already holds it."""
    async with system.subscribe(chat_id, "alice") as sub:
        text = sub.state.response.text if sub.state.response else ""
        async for item in sub:
            if isinstance(item, TokenDelta):
                assert item.offset == len(text)
                text += item.text
                stored = await committed_text(reader, chat_id, item.response_id)
                assert stored.startswith(text), "a follower got text the log lacks"
            elif isinstance(item, ChatSession.ResponseEnded):
                seen.append(text)
                return


async def test_followers_hold_only_committed_text(start_system, store_kind: str) -> None:
    words = [f"w{i} " for i in range(30)]
    systems: list[ActorSystem] = []
    # on PostgreSQL, a second server process on the same database (either may answer)
    for _ in range(2 if store_kind == "postgres" else 1):
        system = await start_system(ScriptedProvider().then(*words, delay=0.005),
                                    token_flush_ms=20.0)
        slow_commits(system)
        systems.append(system)
    owner = systems[0]
    chat_id = await owner.create_chat("alice")
    seen: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for system in systems:
                # the other process checks the log through its own connections
                nursery.start_soon(follow, system, chat_id, systems[-1], seen)
            await trio.sleep(0.1)  # both followers are in
            await owner.send_message(chat_id, "alice", "count")
    assert seen == ["".join(words)] * len(systems)
    events = await owner.store.run(lambda: list(owner.store.app.events.get(chat_id)))
    batches = [e for e in events if isinstance(e, ChatSession.TokensGenerated)]
    assert len(batches) >= 2  # shown in several groups while it streamed
    assert all(sum(size for size, _ in b.chunks) == len(b.text) for b in batches)
