"""Actor systems on one PostgreSQL surviving the loss of their dedicated connections."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import pytest
import trio

from app.actors import ActorSystem, TokenDelta
from app.actors.cluster import PostgresLeases
from app.config import Settings
from app.events.domain import ChatSession
from app.events.store import EventStore

from .conftest import ScriptedProvider, stop_system, stored_events, wait_until
from .faults import connection_names, kill_lease_holder, kill_listeners
from .test_system import until_answered


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def followed(text: str, item: Any) -> str:
    """``text`` with the streamed or stored text of ``item``, as a follower joins them: each
    piece must start at or before the end of what it has (no character is ever skipped)."""
    if isinstance(item, TokenDelta | ChatSession.TokensGenerated):
        assert item.offset <= len(text), f"a gap: {item.offset} after {len(text)} characters"
        return text + item.text[len(text) - item.offset :]
    return text


class Problems:
    """What ``problems()`` of some systems said, sampled every 2 ms, and when."""

    def __init__(self, *systems: ActorSystem) -> None:
        self.systems = systems
        self.seen: list[str] = []
        self.last_seen = 0.0

    async def watch(self) -> None:
        while True:
            found = [p for system in self.systems for p in system.problems()]
            if found:
                self.seen.extend(found)
                self.last_seen = trio.current_time()
            await trio.sleep(0.002)


async def replies(system: ActorSystem, chat_id: Any) -> list[str]:
    chat = await system.store.get(chat_id)
    return [m["content"] for m in chat.history if m["role"] == "assistant"]


async def test_each_dedicated_connection_is_named_for_operators(
    start_system, settings: Settings, pg_url: str
) -> None:
    # (the notify connection's queries do not name the schema: it is not found this way)
    system = await start_system(ScriptedProvider(), lease_check_interval_s=60.0)
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "hello")
    await until_answered(system, chat_id)
    names = await trio.to_thread.run_sync(connection_names, pg_url, settings.database_schema)
    schema = settings.database_schema
    assert {f"eventchat-leases:{schema}", f"eventchat-listen:{schema}"} <= set(names)
    assert system.problems() == []


async def test_each_take_bumps_the_epoch_and_a_lost_connection_loses_every_lease(
    settings: Settings, pg_url: str
) -> None:
    store = await trio.to_thread.run_sync(EventStore.open, settings)  # creates the table
    lost: list[UUID] = []
    one = PostgresLeases(settings.replace(lease_check_interval_s=0.05, port=8101), lost.extend)
    two = PostgresLeases(settings.replace(port=8102))
    chat_id, other_chat = uuid4(), uuid4()
    async with trio.open_nursery() as nursery:
        await nursery.start(one.watch)
        first = await one.acquire(chat_id)
        assert first is not None and first.fence is not None
        assert (first.fence.epoch, first.taken_over) == (1, False)
        assert await one.acquire(other_chat) is not None
        assert await two.acquire(chat_id) is None  # held by one
        assert len(kill_lease_holder(pg_url, chat_id)) == 1
        await wait_until(lambda: sorted(lost) == sorted([chat_id, other_chat]))
        second = await two.acquire(chat_id)
        assert second is not None and second.fence is not None
        assert (second.fence.epoch, second.taken_over) == (2, True)
        await wait_until(lambda: one.problem is None)  # connected again
        assert await one.acquire(chat_id) is None
        mine_again = await one.acquire(other_chat)  # this server's own, taken back
        assert mine_again is not None and not mine_again.taken_over
        nursery.cancel_scope.cancel()
    one.close()
    two.close()
    store.close()


async def test_lost_listen_connections_are_made_again_and_followers_miss_nothing(
    start_system, settings: Settings, pg_url: str
) -> None:
    words = [f"w{i} " for i in range(150)]
    owner_model = ScriptedProvider().then(*words, delay=0.01).then("second answer")
    a = await start_system(owner_model, token_flush_ms=30.0)
    b = await start_system(ScriptedProvider())
    chat_id = await a.create_chat("alice")
    await a.send_message(chat_id, "alice", "hello")
    await owner_model.started.wait()
    problems = Problems(a, b)
    async with b.subscribe(chat_id, "alice") as far, trio.open_nursery() as nursery:
        nursery.start_soon(problems.watch)
        text = far.state.response.text if far.state.response else ""
        killed_at = None
        with trio.fail_after(10):
            async for item in far:
                text = followed(text, item)
                if killed_at is None and len(text) > 100:
                    killed = kill_listeners(pg_url, settings.database_schema)
                    assert len(killed) == 2  # one per system
                    killed_at = trio.current_time()
                if isinstance(item, ChatSession.ResponseCompleted):
                    break
        assert killed_at is not None
        await wait_until(lambda: not a.problems() and not b.problems(), within=5)
        nursery.cancel_scope.cancel()
    assert text == "".join(words)  # every character, in order, none twice
    assert any("LISTEN" in problem for problem in problems.seen)
    recovered_s = problems.last_seen - killed_at
    print(f"listen connections lost: both systems listening again after {recovered_s:.2f} s")

    # a message recorded through the follower reaches the owner, which answers it
    with trio.fail_after(5):
        await b.send_message(chat_id, "alice", "again")
        await until_answered(a, chat_id, 2)
    assert (await replies(a, chat_id))[-1] == "second answer"
    assert len(owner_model.requests) == 2


async def test_a_lost_lease_connection_stops_the_owner_and_one_writer_goes_on(
    start_system, settings: Settings, pg_url: str
) -> None:
    first = [f"t{i} " for i in range(300)]
    second = [f"s{i} " for i in range(30)]
    a_model = ScriptedProvider().then(*first, delay=0.01).then(*second, delay=0.005)
    b_model = ScriptedProvider().then(*second, delay=0.005)
    a = await start_system(a_model, lease_check_interval_s=0.2, token_flush_ms=30.0)
    b = await start_system(b_model, lease_check_interval_s=0.2)
    chat_id = await a.create_chat("alice")
    await a.send_message(chat_id, "alice", "long", "m1")
    await a_model.started.wait()
    problems = Problems(a)
    told = trio.Event()

    async def near_follower() -> None:  # a client of the server that loses the chat
        async with a.subscribe(chat_id, "alice") as near:
            async for item in near:
                if isinstance(item, ChatSession.ResponseInterrupted):
                    told.set()

    # b follows the chat, so it tries to take the lease every 2 s (as its owner would die)
    async with b.subscribe(chat_id, "alice"), trio.open_nursery() as nursery:
        nursery.start_soon(near_follower)
        await trio.sleep(0.5)
        nursery.start_soon(problems.watch)
        assert len(kill_lease_holder(pg_url, chat_id)) == 1
        killed_at = trio.current_time()
        with trio.fail_after(5):
            await wait_until(lambda: a_model.closed == 1)  # the model call is closed
            closed_s = trio.current_time() - killed_at
            await told.wait()
            told_s = trio.current_time() - killed_at
        await wait_until(lambda: not a.problems(), within=5)
        recovered_s = problems.last_seen - killed_at
        with trio.fail_after(10):
            await b.send_message(chat_id, "alice", "again", "m2")
            await until_answered(b, chat_id, 2)
            await wait_until(lambda: a.counts()["generating"] + b.counts()["generating"] == 0)
        await trio.sleep(0.3)  # a second writer, if any, would have written by now
        nursery.cancel_scope.cancel()

    assert any("lease" in problem for problem in problems.seen)
    events = await stored_events(b, chat_id)
    interrupted = [e for e in events if isinstance(e, ChatSession.ResponseInterrupted)]
    assert [e.reason for e in interrupted] == ["owner_lost"]
    texts = await replies(b, chat_id)
    assert len(texts) == 2
    # the reply cut short is a prefix of its one generation; the next is exactly one
    assert texts[0] and "".join(first).startswith(texts[0]), texts[0]
    assert texts[1] == "".join(second)
    assert len(a_model.requests) + len(b_model.requests) == 2
    print(f"lease connection lost: model call closed after {closed_s:.2f} s, followers told "
          f"after {told_s:.2f} s, leases back after {recovered_s:.2f} s; stored replies "
          f"{len(texts[0])} characters (cut short, of {len(''.join(first))}) and "
          f"{len(texts[1])} (of {len(''.join(second))})")


async def test_a_chat_taken_over_from_another_server_records_owner_lost(
    start_system,
) -> None:
    a = await start_system(ScriptedProvider().then(*["tok "] * 500, delay=0.01), port=8101)
    chat_id = await a.create_chat("alice")
    await a.send_message(chat_id, "alice", "long")
    await a.send_message(chat_id, "alice", "queued")
    await trio.sleep(0.2)
    await stop_system(a)  # dies: its lease is free, its response open

    survivor_model = ScriptedProvider().then("taken over")
    b = await start_system(survivor_model, port=8102)  # another server starts, finds it
    types = await until_answered(b, chat_id, 2)
    events = await stored_events(b, chat_id)
    interrupted = next(e for e in events if isinstance(e, ChatSession.ResponseInterrupted))
    assert interrupted.reason == "owner_lost"
    assert types[-1] == "ResponseCompleted"
    assert survivor_model.requests[0].messages[-1] == {"role": "user", "content": "queued"}


async def test_the_fence_stops_an_owner_that_has_not_noticed_its_lost_lease(
    start_system, settings: Settings, pg_url: str
) -> None:
    """Another process takes the chat before the old owner checks its lease connection: the
    old owner's next save is refused by the database, and it writes nothing more."""
    words = [f"t{i} " for i in range(400)]
    a_model = ScriptedProvider().then(*words, delay=0.01)
    b_model = ScriptedProvider().then("from b")
    a = await start_system(a_model, lease_check_interval_s=60.0, token_flush_ms=30.0)
    b = await start_system(b_model)
    chat_id = await a.create_chat("alice")
    await a.send_message(chat_id, "alice", "long")
    await a_model.started.wait()
    async with b.subscribe(chat_id, "alice"):  # b tries the lease every 2 s
        await trio.sleep(0.2)
        assert len(kill_lease_holder(pg_url, chat_id)) == 1
        with trio.fail_after(5):
            await wait_until(lambda: b.owns(chat_id), within=5)  # a has not noticed
            await wait_until(lambda: a_model.closed == 1)  # its next save was fenced
            await b.send_message(chat_id, "alice", "again")
            await until_answered(b, chat_id, 2)
        await trio.sleep(0.3)
    assert not a.owns(chat_id)
    events = await stored_events(b, chat_id)
    assert [e.reason for e in events if isinstance(e, ChatSession.ResponseInterrupted)] == [
        "owner_lost"
    ]
    texts = await replies(b, chat_id)
    assert texts[0] and "".join(words).startswith(texts[0]) and texts[1] == "from b"
    assert len(a_model.requests) == 1 and len(b_model.requests) == 1
