"""The chat and message views after each kind of turn, field by field."""

from __future__ import annotations

from datetime import datetime

import trio

from app.config import Settings
from app.events.domain import ChatSession
from app.events.store import EventStore
from app.projections import Views, ViewUpdater, open_views

from .conftest import plain_turn, save_and_wait, timing, usage


def assert_iso_utc(value: str) -> None:
    offset = datetime.fromisoformat(value).utcoffset()
    assert offset is not None and offset.total_seconds() == 0


async def test_plain_turn(store: EventStore, views: Views, runner: ViewUpdater) -> None:
    chat = ChatSession.start(owner="alice", title="Greetings", model="m1")
    rid = plain_turn(chat, "hi there", ("Hel", "lo"), client_message_id="c1", model="m1")
    await save_and_wait(store, views, chat)

    messages, has_more = await views.messages("alice", chat.id)
    assert has_more is False
    user, assistant = messages
    assert set(user) == {"seq", "role", "content", "created_at", "client_message_id",
                         "parent_seq", "siblings"}
    assert (user["parent_seq"], user["siblings"]) == (None, [2])
    assert (user["seq"], user["role"], user["content"], user["client_message_id"]) == (
        2, "user", "hi there", "c1")
    assert_iso_utc(user["created_at"])
    assert assistant == {
        "seq": 3, "role": "assistant", "content": "Hello",
        "created_at": assistant["created_at"], "response_id": rid, "status": "complete",
        "model": "m1", "usage": usage(), "timing": timing(), "tool_calls": [], "error": None,
        "finish_reason": "stop", "parent_seq": 2, "siblings": [3],
    }
    assert_iso_utc(assistant["created_at"])

    got = await views.get_chat("alice", chat.id)
    assert got is not None
    assert got["id"] == str(chat.id) and got["title"] == "Greetings" and got["model"] == "m1"
    assert got["message_count"] == 2
    assert got["usage"] == usage()
    assert got["last_message_preview"] == "Hello"
    assert got["created_at"] <= got["updated_at"]
    assert await views.get_chat("bob", chat.id) is None
    assert await views.messages("bob", chat.id) == ([], False)


async def test_user_message_without_client_id(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    chat = ChatSession.start(owner="alice")
    chat.receive_message("no id")
    await save_and_wait(store, views, chat)
    [message], _ = await views.messages("alice", chat.id)
    assert "client_message_id" not in message


async def test_tool_turn(store: EventStore, views: Views, runner: ViewUpdater) -> None:
    chat = ChatSession.start(owner="alice")
    chat.receive_message("what is 12*7")
    rid = chat.start_response("offline", "offline")
    chat.invoke_tool(rid, "call-1", "calculator", {"expression": "12*7"})
    chat.complete_tool(rid, "call-1", 84, 0.4)
    chat.invoke_tool(rid, "call-2", "search_chats", {"query": "x"})
    chat.fail_tool(rid, "call-2", "boom", 1.5)
    chat.record_tokens(rid, "84", 1)
    chat.complete_response(rid, "offline", "stop", usage(), timing())
    await save_and_wait(store, views, chat)
    [_, assistant], _ = await views.messages("alice", chat.id)
    assert assistant["content"] == "84"
    assert assistant["tool_calls"] == [
        {"call_id": "call-1", "tool": "calculator", "arguments": {"expression": "12*7"},
         "result": 84, "error": None, "duration_ms": 0.4},
        {"call_id": "call-2", "tool": "search_chats", "arguments": {"query": "x"},
         "result": None, "error": "boom", "duration_ms": 1.5},
    ]
    stats = await views.stats(owner="alice")
    assert stats["totals"]["tool_calls"] == 2 and stats["totals"]["tool_errors"] == 1
    assert stats["tools"] == {
        "calculator": {"calls": 1, "errors": 0, "mean_duration_ms": 0.4},
        "search_chats": {"calls": 1, "errors": 1, "mean_duration_ms": 1.5},
    }


async def test_stopped_failed_interrupted(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    chat = ChatSession.start(owner="alice")
    chat.receive_message("one")
    rid1 = chat.start_response("m", "offline")
    chat.record_tokens(rid1, "par", 1)
    chat.stop_response(rid1, usage(3, 1), timing(duration=50.0))
    chat.receive_message("two")
    rid2 = chat.start_response("m", "offline")
    chat.fail_response(rid2, {"code": "upstream_error", "message": "bad gateway"}, usage(3, 0),
                       timing(duration=20.0))
    chat.receive_message("three")
    rid3 = chat.start_response("m", "offline")
    chat.record_tokens(rid3, "half", 1)
    chat.interrupt_response("server restarted")
    await save_and_wait(store, views, chat)

    messages, _ = await views.messages("alice", chat.id)
    stopped, failed, interrupted = (m for m in messages if m["role"] == "assistant")
    assert (stopped["response_id"], stopped["status"], stopped["content"]) == (rid1, "stopped",
                                                                               "par")
    assert stopped["usage"] == usage(3, 1) and stopped["timing"] == timing(duration=50.0)
    assert stopped["error"] is None
    assert (failed["response_id"], failed["status"], failed["content"]) == (rid2, "failed", "")
    assert failed["error"] == {"code": "upstream_error", "message": "bad gateway"}
    assert failed["usage"] == usage(3, 0)
    assert (interrupted["response_id"], interrupted["status"]) == (rid3, "interrupted")
    assert interrupted["content"] == "half"
    assert interrupted["usage"] is None and interrupted["timing"] is None
    assert interrupted["error"] == {"code": "interrupted", "message": "server restarted"}
    got = await views.get_chat("alice", chat.id)
    assert got is not None and got["message_count"] == 6
    stats = await views.stats(owner="alice", chat_id=chat.id)
    assert stats["totals"]["responses"] == 3 and stats["totals"]["failed_responses"] == 1


async def test_streaming_message_is_visible(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    chat = ChatSession.start(owner="alice")
    chat.receive_message("tell me")
    rid = chat.start_response("m", "offline")
    chat.record_tokens(rid, "Once ", 1)
    await save_and_wait(store, views, chat)
    chat.record_tokens(rid, "upon", 1)
    await save_and_wait(store, views, chat)
    [_, assistant], _ = await views.messages("alice", chat.id)
    assert (assistant["seq"], assistant["status"], assistant["content"]) == (3, "streaming",
                                                                             "Once upon")
    assert assistant["usage"] is None and assistant["timing"] is None
    chat.record_tokens(rid, " a time", 1)
    chat.complete_response(rid, "m", "stop", usage(), timing())
    await save_and_wait(store, views, chat)
    [_, assistant], _ = await views.messages("alice", chat.id)
    assert (assistant["status"], assistant["content"]) == ("complete", "Once upon a time")


async def test_rename_and_model_fallback(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    chat = ChatSession.start(owner="alice", title="old")
    plain_turn(chat, model="served-model")
    chat.rename("new title")
    await save_and_wait(store, views, chat)
    got = await views.get_chat("alice", chat.id)
    assert got is not None and got["title"] == "new title" and got["model"] == "served-model"


async def test_views_made_before_finish_reason_get_the_column(settings: Settings) -> None:
    """Views created by an earlier version (no ``finish_reason`` column) are opened, given
    the column, and filled by the next projection."""
    views = await trio.to_thread.run_sync(open_views, settings)
    try:
        def drop_column() -> None:
            with views.db.write() as tx:
                tx.run("ALTER TABLE view_messages DROP COLUMN finish_reason")

        await trio.to_thread.run_sync(drop_column)
    finally:
        views.close()
    store = await trio.to_thread.run_sync(EventStore.open, settings)
    views = await trio.to_thread.run_sync(open_views, settings)
    try:
        runner = ViewUpdater(settings, store, views, poll_interval=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            chat = ChatSession.start("alice", "old views")
            plain_turn(chat)
            await save_and_wait(store, views, chat)
            messages, _ = await views.messages("alice", chat.id, 10)
            nursery.cancel_scope.cancel()
        assert messages[-1]["finish_reason"] == "stop"
    finally:
        views.close()
        store.close()


async def test_chats_in_views_made_before_the_tree_read_as_one_line_until_rebuilt(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    """Views projected before messages had parents (no leaf, no parents) show a chat as its
    line, in seq order, also once it goes on (``eventchat projections rebuild`` gives it its
    tree, as every rebuild test checks)."""
    chat = ChatSession.start("alice", "older")
    plain_turn(chat, "q1", ("a1",))
    await save_and_wait(store, views, chat)

    def forget_the_tree() -> None:
        with views.db.write() as tx:
            tx.run("UPDATE view_chats SET leaf_seq = NULL")
            tx.run("UPDATE view_messages SET parent_seq = NULL")

    await trio.to_thread.run_sync(forget_the_tree)
    plain_turn(chat, "q2", ("a2",))
    await save_and_wait(store, views, chat)
    messages, _ = await views.messages("alice", chat.id)
    assert [m["content"] for m in messages] == ["q1", "a1", "q2", "a2"]
    assert [m["siblings"] for m in messages] == [[m["seq"]] for m in messages]
