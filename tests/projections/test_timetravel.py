"""Time travel (``GET /chat/{id}?at_seq=N``) against the views, on a chat with branches.

A seeded workload of turns, edits, regenerates and branch switches (``workload``) is saved
one step at a time; after each save the views hold the chat right after its last event, and
the chat rebuilt from the log at that seq must read the same: the chat, and every page of
its active branch with parents and siblings. The openai export follows the same branch,
and keeps each round of tool calls with the text the model streamed before it.
"""

from __future__ import annotations

import random

import trio
from openai.types.chat import ChatCompletionMessageParam
from pydantic import TypeAdapter

from app.events.domain import ChatSession
from app.events.store import EventStore
from app.projections import Views, ViewUpdater
from app.projections.timetravel import chat_page_at
from app.projections.transcript import conversation, openai_messages
from tests.fakes.openai_server import messages_problem

from .conftest import save_and_wait
from .workload import random_turn


async def test_the_chat_at_every_saved_seq_reads_as_the_views_did(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    rng = random.Random(16)
    chat = ChatSession.start(owner="alice", title="Branches", system_prompt="Be brief.")
    shown = []
    for n in range(24):
        random_turn(chat, rng, n)
        await save_and_wait(store, views, chat)
        pages = [await views.messages("alice", chat.id, limit) for limit in (1000, 3)]
        older = await views.messages("alice", chat.id, 2, before_seq=pages[1][0][0]["seq"])
        shown.append((chat.version, await views.get_chat("alice", chat.id), pages, older))

    edits = 0
    for seq, chat_view, pages, older in shown:
        rebuilt = [await trio.to_thread.run_sync(chat_page_at, store.app, chat.id, seq, limit)
                   for limit in (1000, 3)]
        assert [r[0] for r in rebuilt] == [chat_view, chat_view], seq
        assert [r[1:] for r in rebuilt] == pages, seq
        earlier = await trio.to_thread.run_sync(chat_page_at, store.app, chat.id, seq, 2,
                                                pages[1][0][0]["seq"])
        assert earlier[1:] == older, seq
        edits += any(len(m["siblings"]) > 1 for m in pages[0][0])
    assert edits > 5  # the workload did branch

    talk = await trio.to_thread.run_sync(conversation, store.app, chat.id)
    exported = openai_messages(talk)
    active = shown[-1][2][0][0]
    assert exported[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in exported if m["role"] == "user"] == [
        m["content"] for m in active if m["role"] == "user"]


async def test_the_openai_export_keeps_each_round_of_tool_calls_with_its_text(
    store: EventStore,
) -> None:
    chat = ChatSession.start(owner="alice", title="Rounds")
    chat.receive_message("what is 12*7, and the time?")
    rid = chat.start_response("m1", "offline")
    chat.record_tokens(rid, "Let me see. ", 3)
    chat.invoke_tool(rid, "c1", "calculator", {"expression": "12*7"})
    chat.invoke_tool(rid, "c2", "clock", {})
    chat.complete_tool(rid, "c1", 84, 0.2)
    chat.fail_tool(rid, "c2", "tool_timeout: no answer", 5000.0)
    chat.record_tokens(rid, "84. ", 2)
    chat.invoke_tool(rid, "c3", "clock", {})
    chat.complete_tool(rid, "c3", "06:00", 0.1)
    chat.record_tokens(rid, "It is 06:00.", 4)
    chat.invoke_tool(rid, "c4", "clock", {})  # never ended: the reply was interrupted
    chat.interrupt_response("server_restarted")
    await store.save(chat)

    talk = await trio.to_thread.run_sync(conversation, store.app, chat.id)
    messages = openai_messages(talk)

    def call(call_id: str, tool: str, arguments: str) -> dict[str, object]:
        return {"id": call_id, "type": "function",
                "function": {"name": tool, "arguments": arguments}}

    assert messages == [
        {"role": "user", "content": "what is 12*7, and the time?"},
        {"role": "assistant", "content": "Let me see. ", "tool_calls": [
            call("c1", "calculator", '{"expression": "12*7"}'), call("c2", "clock", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": "84"},
        {"role": "tool", "tool_call_id": "c2", "content": '{"error": "tool_timeout: no answer"}'},
        {"role": "assistant", "content": "84. ", "tool_calls": [call("c3", "clock", "{}")]},
        {"role": "tool", "tool_call_id": "c3", "content": '"06:00"'},
        {"role": "assistant", "content": "It is 06:00."},
    ]
    assert messages_problem(messages) is None
    TypeAdapter(list[ChatCompletionMessageParam]).validate_python(messages)
