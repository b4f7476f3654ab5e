"""The message tree in the aggregate: parents, siblings, the active branch, the model's
context, and what it costs to store."""

from __future__ import annotations

import pytest

from app.config import Settings
from app.events.domain import ChatSession
from app.events.errors import MessageNotFoundError, ResponseInProgressError
from app.events.store import EventStore
from app.events.tree import Node, Tree


def answer(chat: ChatSession, text: str) -> int:
    """Answers the oldest waiting request; returns the reply's seq."""
    rid = chat.start_response("m", "p")
    seq = chat.version
    chat.record_tokens(rid, text, 1)
    chat.complete_response(rid, "m", "stop", {}, {})
    return seq


def said(chat: ChatSession) -> list[str]:
    return [m["content"] for m in chat.context(100)]


def test_edits_and_regenerates_make_siblings_and_the_context_follows_the_branch() -> None:
    chat = ChatSession.start("u", system_prompt="be brief")
    q1 = chat.receive_message("q1")
    a1 = answer(chat, "a1")
    chat.receive_message("q2")
    a2 = answer(chat, "a2")
    chat.regenerate()  # the last reply
    assert said(chat) == ["be brief", "q1", "a1", "q2"]
    a2b = answer(chat, "a2b")
    q1b = chat.receive_message("q1b", edit_of=q1)
    assert said(chat) == ["be brief", "q1b"]
    answer(chat, "a1b")
    tree = chat.tree()
    assert tree.siblings(a2b) == [a2, a2b] and tree.siblings(q1b) == [q1, q1b]
    assert [m["content"] for m in chat.history] == ["q1b", "a1b"]
    assert chat.select_branch(q1) == a2b  # the newest of the deepest under q1
    assert [m["content"] for m in chat.history] == ["q1", "a1", "q2", "a2b"]
    recorded = len(chat.pending_events)
    assert chat.select_branch(a1) == a2b and len(chat.pending_events) == recorded  # no change
    chat.receive_message("q3")
    assert said(chat) == ["be brief", "q1", "a1", "q2", "a2b", "q3"]


def test_messages_queued_behind_an_unanswered_one_read_as_one_line() -> None:
    chat = ChatSession.start("u")
    q1 = chat.receive_message("q1")
    rid = chat.start_response("m", "p")
    q2 = chat.receive_message("q2")  # while q1 is answered
    q3 = chat.receive_message("q3")  # while q2 waits
    chat.complete_response(rid, "m", "stop", {}, {})
    answer(chat, "a2")
    assert [m["content"] for m in chat.history] == ["q1", "", "q2", "a2", "q3"]
    answer(chat, "a3")
    assert [m["content"] for m in chat.history] == ["q1", "", "q2", "a2", "q3", "a3"]
    tree = chat.tree()
    assert all(tree.siblings(seq) == [seq] for seq in tree.nodes) and q2 > q1 and q3 > q2


def test_refusals_record_nothing() -> None:
    chat = ChatSession.start("u")
    q1 = chat.receive_message("q1")
    with pytest.raises(ResponseInProgressError):
        chat.receive_message("edit", edit_of=q1)  # not answered yet
    a1 = answer(chat, "a1")
    before = len(chat.pending_events)
    for refused in (lambda: chat.receive_message("x", edit_of=a1),
                    lambda: chat.regenerate(q1), lambda: chat.regenerate(99),
                    lambda: chat.select_branch(99)):
        with pytest.raises(MessageNotFoundError):
            refused()
    chat.receive_message("q2")
    with pytest.raises(ResponseInProgressError):
        chat.select_branch(q1)
    assert len(chat.pending_events) == before + 1


def test_deepest_is_the_newest_of_the_deepest_descendants() -> None:
    tree = Tree([Node(2, "user", None), Node(3, "assistant", 2), Node(5, "user", 3),
                 Node(6, "assistant", 5), Node(8, "assistant", 2)])
    assert tree.deepest(2) == 6 and tree.deepest(8) == 8 and tree.path(6) == [2, 3, 5, 6]
    assert tree.last_reply(5) == 3 and tree.siblings(8) == [3, 8]


def test_a_snapshot_from_before_the_tree_reads_as_its_line() -> None:
    state = {"history": [{"role": "user", "content": "q1", "seq": 2},
                         {"role": "assistant", "content": "a1", "seq": 5}]}
    ChatSession.upcast_v1_v2(state)
    assert state["leaf"] == 5 and [n["parent"] for n in state["messages"]] == [None, 2]


async def test_fifty_edits_store_a_constant_number_of_bytes_each(settings: Settings) -> None:
    store = EventStore.open(settings)
    try:
        chat = ChatSession.start("u")
        first = chat.receive_message("q0")
        answer(chat, "a0")
        for n in range(1, 30):  # a long conversation first
            deep = chat.receive_message(f"q{n}")
            answer(chat, f"a{n}")
        await store.save(chat)
        sizes = []
        for n in range(50):
            chat.receive_message(f"edit {n:02}", edit_of=first if n % 2 else deep)
            answer(chat, f"reply {n:02}")
            events = len(chat.pending_events)
            recordings = await store.save(chat)
            assert events == len(recordings) == 4
            sizes.append(sum(len(r.notification.state) for r in recordings))
        assert max(sizes) - min(sizes) <= 16, sizes  # no copy of the branch grows with depth
        reloaded = await store.get(chat.id)
        assert reloaded.history == chat.history
        assert len(reloaded.tree().siblings(first)) == len(reloaded.tree().siblings(deep)) == 26
    finally:
        store.close()


def test_a_regenerate_is_answered_by_the_model_its_message_asked_for() -> None:
    chat = ChatSession.start("u", model="m1")
    chat.receive_message("q", model="m2")
    answer(chat, "a")
    chat.regenerate()
    assert chat.next_model() == "m2"


def test_edits_and_regenerates_sent_while_a_reply_streams_wait_their_turn() -> None:
    chat = ChatSession.start("u")
    q1 = chat.receive_message("q1")
    a1 = answer(chat, "a1")
    chat.receive_message("q2")
    rid = chat.start_response("m", "p")  # q2 is being answered...
    chat.receive_message("q1 edited", edit_of=q1)  # ...when these arrive
    with pytest.raises(MessageNotFoundError):
        chat.regenerate()  # the edit's branch (now the active one) has no reply yet
    chat.regenerate(a1)
    chat.record_tokens(rid, "a2", 1)
    chat.complete_response(rid, "m", "stop", {}, {})
    assert said(chat) == ["q1 edited"]
    answer(chat, "a1 for the edit")
    assert said(chat) == ["q1"] and [m["content"] for m in chat.history] == ["q1"]
    answer(chat, "a1 again")
    assert [m["content"] for m in chat.history] == ["q1", "a1 again"]
    assert len(chat.tree().siblings(q1)) == 2 and not chat.pending
