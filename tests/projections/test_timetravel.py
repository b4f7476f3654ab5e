"""Time travel (``GET /chat/{id}?at_seq=N``) against the views, on a chat with branches.

A seeded workload of turns, edits, regenerates and branch switches (``workload``) is saved
one step at a time; after each save the views hold the chat right after its last event, and
the chat rebuilt from the log at that seq must read the same: the chat, and every page of
its active branch with parents and siblings. The openai export follows the same branch.
"""

from __future__ import annotations

import random

import trio

from app.events.domain import ChatSession
from app.events.store import EventStore
from app.projections import Views, ViewUpdater
from app.projections.timetravel import chat_page_at
from app.projections.transcript import conversation, openai_messages

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

    row, prompt, branch = await trio.to_thread.run_sync(conversation, store.app, chat.id)
    exported = openai_messages(prompt, branch)
    active = shown[-1][2][0][0]
    assert exported[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in exported if m["role"] == "user"] == [
        m["content"] for m in active if m["role"] == "user"]
