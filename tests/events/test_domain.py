"""The ChatSession aggregate: invariants are checked before anything is recorded."""

from __future__ import annotations

import pytest

from app.events.domain import ChatSession
from app.events.errors import (
    DuplicateMessageError,
    EmptyMessageError,
    MessageTooLongError,
    NoResponseInProgressError,
    ResponseInProgressError,
)


def chat_with_message() -> ChatSession:
    chat = ChatSession.start("alice", "t")
    chat.receive_message("hello", "c-1")
    return chat


def test_seq_is_the_event_number() -> None:
    chat = ChatSession.start("alice", "  ")
    assert chat.title == "New chat" and chat.version == 1
    assert chat.receive_message("one") == 2
    assert chat.receive_message("two") == 3
    assert chat.pending == [2, 3]


def test_refused_commands_record_nothing() -> None:
    chat = chat_with_message()
    before = len(chat.pending_events)
    with pytest.raises(EmptyMessageError):
        chat.receive_message(" \n ")
    with pytest.raises(MessageTooLongError):
        chat.receive_message("x" * 11, max_chars=10)
    with pytest.raises(DuplicateMessageError) as duplicate:
        chat.receive_message("hello again", "c-1")
    assert duplicate.value.seq == 2
    with pytest.raises(NoResponseInProgressError):
        chat.record_tokens("nope", "text", 1)
    assert len(chat.pending_events) == before


def test_one_response_at_a_time_and_nothing_after_its_end() -> None:
    chat = chat_with_message()
    chat.receive_message("second")
    rid = chat.start_response("m", "offline")
    with pytest.raises(ResponseInProgressError):
        chat.start_response("m", "offline")
    chat.record_tokens(rid, "Hi", 1)
    chat.record_tokens(rid, " there", 1)
    chat.complete_response(rid, "m", "stop", {}, {})
    with pytest.raises(NoResponseInProgressError):
        chat.record_tokens(rid, "late", 1)
    with pytest.raises(NoResponseInProgressError):
        chat.stop_response(rid, {}, {})
    assert chat.reply_to(2) == (rid, chat.outcomes[rid])
    assert chat.outcomes[rid].text == "Hi there" and chat.outcomes[rid].status == "complete"
    assert chat.pending == [3]


def test_token_batches_carry_their_offsets() -> None:
    chat = chat_with_message()
    rid = chat.start_response("m", "offline")
    chat.record_tokens(rid, "abc", 2)
    chat.record_tokens(rid, "de", 1)
    batches = [e for e in chat.pending_events if isinstance(e, ChatSession.TokensGenerated)]
    assert [(b.offset, b.text) for b in batches] == [(0, "abc"), (3, "de")]


def test_tool_calls_end_once() -> None:
    chat = chat_with_message()
    rid = chat.start_response("m", "offline")
    with pytest.raises(NoResponseInProgressError):
        chat.complete_tool(rid, "never-invoked", 1, 0.1)
    chat.invoke_tool(rid, "call-1", "calculator", {"expression": "1+1"})
    chat.fail_tool(rid, "call-1", "bad", 0.1)
    with pytest.raises(NoResponseInProgressError):
        chat.complete_tool(rid, "call-1", 2, 0.1)


def test_interrupt_keeps_partial_text_and_context_orders_answers() -> None:
    chat = chat_with_message()
    chat.receive_message("queued")
    rid = chat.start_response("m", "offline")
    chat.record_tokens(rid, "part", 1)
    assert chat.interrupt_response("server_restarted") == rid
    assert chat.interrupt_response("again") is None
    assert chat.outcomes[rid].status == "interrupted" and chat.outcomes[rid].text == "part"
    assert chat.context(10) == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "part"},
        {"role": "user", "content": "queued"},
    ]
