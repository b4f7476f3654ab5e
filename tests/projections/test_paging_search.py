"""Paging of messages and chats, and full-text search within one user's chats."""

from __future__ import annotations

import json

import trio

from app.events.domain import ChatSession
from app.events.store import EventStore
from app.llm.base import ToolContext
from app.llm.tools import ToolRegistry
from app.projections import Views, ViewUpdater, register_search_tool

from .conftest import plain_turn, save_and_wait


async def test_message_pages_both_ways(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    chat = ChatSession.start(owner="alice")
    for i in range(10):
        plain_turn(chat, f"m{i}", (f"r{i}",))
    await save_and_wait(store, views, chat)
    # 10 turns of 4 events: user at seq 2 + 4i, assistant at 3 + 4i (its ResponseStarted)
    all_seqs = [s for i in range(10) for s in (2 + 4 * i, 3 + 4 * i)]

    latest, more = await views.messages("alice", chat.id, limit=6)
    assert [m["seq"] for m in latest] == all_seqs[-6:] and more
    older, more = await views.messages("alice", chat.id, limit=6, before_seq=latest[0]["seq"])
    assert [m["seq"] for m in older] == all_seqs[-12:-6] and more
    oldest, more = await views.messages("alice", chat.id, limit=10, before_seq=older[0]["seq"])
    assert [m["seq"] for m in oldest] == all_seqs[:8] and not more

    newer, more = await views.messages("alice", chat.id, limit=5, after_seq=0)
    assert [m["seq"] for m in newer] == all_seqs[:5] and more
    rest, more = await views.messages("alice", chat.id, limit=100, after_seq=newer[-1]["seq"])
    assert [m["seq"] for m in rest] == all_seqs[5:] and not more
    assert [m["content"] for m in rest[-2:]] == ["m9", "r9"]


async def test_chat_list_cursor(store: EventStore, views: Views, runner: ViewUpdater) -> None:
    chats = [ChatSession.start(owner="alice", title=f"chat {i}") for i in range(7)]
    for chat in chats:  # one save each: distinct activity times, in this order
        plain_turn(chat)
        await save_and_wait(store, views, chat)
    await save_and_wait(store, views, ChatSession.start(owner="bob"))
    plain_turn(chats[2], "bump")
    await save_and_wait(store, views, chats[2])

    seen: list[str] = []
    cursor = None
    for _ in range(5):
        page, cursor = await views.list_chats("alice", limit=3, cursor=cursor)
        seen += [c["title"] for c in page]
        if cursor is None:
            break
    assert seen == ["chat 2", "chat 6", "chat 5", "chat 4", "chat 3", "chat 1", "chat 0"]
    assert (await views.list_chats("alice", cursor="not a cursor"))[0][0]["title"] == "chat 2"
    page, cursor = await views.list_chats("alice")
    assert cursor is None and page[0]["message_count"] == 4


async def test_search_own_chats_only(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    mine = ChatSession.start(owner="alice", title="Trip planning")
    plain_turn(mine, "Which trains run to Lisbon?", ("The night trains to Lisbon leave at 9",))
    plain_turn(mine, "and buses?", ("Buses too",))
    other = ChatSession.start(owner="alice", title="Cooking")
    plain_turn(other, "a recipe for soup", ("Boil water",))
    theirs = ChatSession.start(owner="bob", title="Lisbon secrets")
    plain_turn(theirs, "Lisbon trains", ("Lisbon trains are secret",))
    await save_and_wait(store, views, mine, other, theirs)

    results = await views.search("alice", "lisbon trains")
    assert [r["chat"]["id"] for r in results] == [str(mine.id)]
    snippets = results[0]["snippets"]
    assert {(s["seq"], s["role"]) for s in snippets} == {(2, "user"), (3, "assistant")}
    assert all("Lisbon" in s["snippet"] for s in snippets)
    assert [r["chat"]["id"] for r in await views.search("alice", "train")] == [str(mine.id)]
    assert await views.search("carol", "lisbon") == []
    assert [r["chat"]["id"] for r in await views.search("bob", "lisbon")] == [str(theirs.id)]
    by_title = await views.search("alice", "cooking")
    assert [(r["chat"]["id"], r["snippets"]) for r in by_title] == [(str(other.id), [])]
    assert await views.search("alice", "\"(* -") == []


async def test_search_tool_uses_the_callers_owner(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    mine = ChatSession.start(owner="alice", title="Mine")
    plain_turn(mine, "the zebra question")
    theirs = ChatSession.start(owner="bob", title="Theirs")
    plain_turn(theirs, "a zebra secret")
    await save_and_wait(store, views, mine, theirs)
    registry = ToolRegistry()
    register_search_tool(registry, views)
    assert "search_chats" in registry
    with trio.fail_after(5):
        result = await registry.call("search_chats", json.dumps({"query": "zebra"}),
                                     ToolContext(owner="alice", chat_id=str(mine.id)))
    assert [r["chat_id"] for r in result["results"]] == [str(mine.id)]
    assert result["results"][0]["snippets"][0]["seq"] == 2
