"""The event store on both backends: saving, loading, conflicts, encryption at rest."""

from __future__ import annotations

import sqlite3
from uuid import uuid4

import psycopg
import pytest
import trio
from eventsourcing.cipher import AESCipher

from app.config import Settings
from app.events.domain import ChatSession
from app.events.errors import ChatNotFoundError, ConcurrencyError
from app.events.store import EventStore


async def open_store(settings: Settings) -> EventStore:
    return await trio.to_thread.run_sync(EventStore.open, settings)


async def test_saved_chat_loads_back_and_nudges(settings: Settings) -> None:
    store = await open_store(settings)
    positions: list[int] = []
    store.on_saved.append(positions.append)
    chat = ChatSession.start("alice", "hello")
    chat.receive_message("hi", "c-1")
    await store.save(chat)
    loaded = await store.get(chat.id)
    assert (loaded.owner, loaded.title, loaded.version) == ("alice", "hello", 2)
    assert loaded.client_message_ids == {"c-1": 2}
    assert positions == [await store.max_position()]
    with pytest.raises(ChatNotFoundError):
        await store.get(uuid4())
    store.close()


async def test_a_stale_writer_gets_a_conflict(settings: Settings) -> None:
    store = await open_store(settings)
    chat = ChatSession.start("alice")
    await store.save(chat)
    first, second = await store.get(chat.id), await store.get(chat.id)
    first.receive_message("from one writer")
    await store.save(first)
    second.receive_message("from another")
    with pytest.raises(ConcurrencyError):
        await store.save(second)
    assert [m["content"] for m in (await store.get(chat.id)).history] == ["from one writer"]
    store.close()


def raw_event_bytes(settings: Settings) -> bytes:
    if settings.database_url:
        table = f'"{settings.database_schema}".eventchat_events'
        with psycopg.connect(settings.database_url) as conn:
            rows = conn.execute(f"SELECT state FROM {table}").fetchall()  # noqa: S608
    else:
        with sqlite3.connect(settings.data_dir / "events.sqlite") as conn:
            rows = conn.execute("SELECT state FROM stored_events").fetchall()
    return b"".join(bytes(row[0]) for row in rows)


async def test_events_can_be_encrypted_and_compressed_at_rest(settings: Settings) -> None:
    secret = settings.replace(cipher_key=AESCipher.create_key(16), compress=True)
    store = await open_store(secret)
    chat = ChatSession.start("alice", "private")
    chat.receive_message("my secret plan " * 20)
    await store.save(chat)
    raw = await trio.to_thread.run_sync(raw_event_bytes, secret)
    assert raw and b"secret plan" not in raw and b"alice" not in raw
    loaded = await store.get(chat.id)
    assert loaded.history[0]["content"] == "my secret plan " * 20
    store.close()


async def test_unfinished_chats_are_followed_incrementally(settings: Settings) -> None:
    from app.events.application import UnfinishedChats

    store = await open_store(settings)
    waiting, answered = ChatSession.start("alice"), ChatSession.start("alice")
    waiting.receive_message("still waiting")
    answered.receive_message("question")
    rid = answered.start_response("m", "offline")
    await store.save(waiting, answered)
    unfinished = UnfinishedChats(store.app)
    assert set(await store.run(unfinished.scan)) == {waiting.id, answered.id}
    position = unfinished.position

    answered.complete_response(rid, "m", "stop", {}, {})
    await store.save(answered)
    assert await store.run(unfinished.scan) == [waiting.id]
    assert unfinished.position == await store.max_position() > position
    answered.regenerate()  # asks for an answer again, as a message does
    await store.save(answered)
    assert set(await store.run(unfinished.scan)) == {waiting.id, answered.id}
    store.close()


async def test_a_chat_recorded_before_max_tokens_existed_loads_with_none(
    settings: Settings,
) -> None:
    """A ``Started`` event of version 1 (no ``max_tokens``), as stored by earlier versions,
    is read with ``max_tokens`` None, and its chat goes on."""
    from dataclasses import replace

    from eventsourcing.persistence import Mapper

    store = await open_store(settings)
    try:
        mapper = Mapper(store.app.mapper.transcoder)  # as they wrote it: no chat keys
        chat = ChatSession.start("alice", "old", max_tokens=None)
        stored = mapper.to_stored_event(chat.collect_events()[0])
        state = mapper.transcoder.decode(stored.state)
        del state["max_tokens"]
        state.pop("class_version", None)
        old = replace(stored, state=mapper.transcoder.encode(state))
        await trio.to_thread.run_sync(store.app.recorder.insert_events, [old])
        loaded = await store.get(chat.id)
        assert loaded.max_tokens is None and loaded.title == "old"
        loaded.receive_message("still works")
        await store.save(loaded)
        assert (await store.get(chat.id)).history[0]["content"] == "still works"
    finally:
        store.close()


async def test_messages_recorded_before_the_tree_read_as_one_line(settings: Settings) -> None:
    """``MessageReceived`` of version 2 (no ``parent_seq``): each message follows the chat's
    leaf when it was recorded, and the chat branches from there on."""
    from dataclasses import replace

    from eventsourcing.persistence import Mapper

    store = await open_store(settings)
    try:
        mapper = Mapper(store.app.mapper.transcoder)  # as they wrote it: no chat keys
        chat = ChatSession.start("alice", "old")
        for text in ("q1", "q2"):
            chat.receive_message(text)
            rid = chat.start_response("m", "offline")
            chat.record_tokens(rid, f"answer to {text}", 1)
            chat.complete_response(rid, "m", "stop", {}, {})
        old = []
        for event in chat.collect_events():
            stored = mapper.to_stored_event(event)
            if isinstance(event, ChatSession.MessageReceived):
                state = mapper.transcoder.decode(stored.state)
                del state["parent_seq"], state["edit_of"]
                state["class_version"] = 2
                stored = replace(stored, state=mapper.transcoder.encode(state))
            old.append(stored)
        await trio.to_thread.run_sync(store.app.recorder.insert_events, old)
        loaded = await store.get(chat.id)
        assert [m["content"] for m in loaded.history] == [
            "q1", "answer to q1", "q2", "answer to q2"]
        loaded.receive_message("q2 again", edit_of=loaded.history[2]["seq"])
        assert [m["content"] for m in loaded.context(10)] == ["q1", "answer to q1", "q2 again"]
    finally:
        store.close()


async def test_a_chat_in_a_snapshot_from_before_the_tree_is_read_from_its_events(
    settings: Settings,
) -> None:
    """A snapshot of version 1 kept the active line (``history``, replies numbered by their
    ending event): the chat is read again from its events, with the seqs the views show."""
    store = await open_store(settings)
    try:
        chat = ChatSession.start("alice", "snapshotted")
        for text in ("q1", "q2"):
            chat.receive_message(text)
            rid = chat.start_response("m", "offline")
            chat.record_tokens(rid, f"answer to {text}", 1)
            chat.complete_response(rid, "m", "stop", {}, {})
        await store.save(chat)
        app = store.app
        snapshot_class = getattr(ChatSession, "Snapshot", type(app).snapshot_class)
        taken = snapshot_class.take(chat)
        state = {k: v for k, v in taken.state.items()
                 if k not in ("messages", "leaf", "requests", "class_version")}
        state["history"] = [{"role": "user", "content": "q1", "seq": 2},
                            {"role": "assistant", "content": "answer to q1", "seq": 5},
                            {"role": "user", "content": "q2", "seq": 6},
                            {"role": "assistant", "content": "answer to q2", "seq": 9}]
        old = snapshot_class(originator_id=taken.originator_id,  # type: ignore[call-arg]
                             originator_version=taken.originator_version,
                             timestamp=taken.timestamp, topic=taken.topic, state=state)
        assert app.snapshots is not None
        await trio.to_thread.run_sync(app.snapshots.put, [old])
        raw = await trio.to_thread.run_sync(app.repository.get, chat.id)  # the snapshot alone
        assert raw.from_line_snapshot and [m["seq"] for m in raw.history] == [2, 5, 6, 9]
        loaded = await store.get(chat.id)
        assert [m["seq"] for m in loaded.history] == [2, 3, 6, 7]  # replies: ResponseStarted
        assert loaded.history == chat.history and not loaded.from_line_snapshot
    finally:
        store.close()
