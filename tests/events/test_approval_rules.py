"""The rules of a decision on a tool call that waits for approval (``ChatSession``)."""

from __future__ import annotations

import pytest

from app.events.domain import ChatSession
from app.events.errors import AlreadyDecidedError, InvalidTextError, ToolCallNotFoundError


def waiting_chat() -> tuple[ChatSession, str]:
    chat = ChatSession.start("alice")
    chat.receive_message("what is 6*7?")
    response_id = chat.start_response("m", "p")
    chat.invoke_tool(response_id, "free", "current_time", {})
    chat.invoke_tool(response_id, "asked", "calculator", {"expression": "6*7"})
    chat.request_tool_approval(response_id, "asked")
    return chat, response_id


def test_the_first_decision_wins_even_after_its_response_ended() -> None:
    chat, response_id = waiting_chat()
    assert chat.current is not None and chat.current.waiting_call() is not None
    with pytest.raises(ToolCallNotFoundError):
        chat.decide_tool("free", True, None, "alice")  # it needs no decision
    with pytest.raises(ToolCallNotFoundError):
        chat.decide_tool("nope", True, None, "alice")
    with pytest.raises(InvalidTextError):
        chat.decide_tool("asked", False, "bad\x00reason", "alice")
    seq = chat.decide_tool("asked", False, "not now", "bob")
    assert seq == chat.version
    decided = chat.pending_events[-1]
    assert isinstance(decided, ChatSession.ToolDecided)
    assert (decided.approve, decided.reason, decided.decided_by) == (False, "not now", "bob")
    call = chat.tool_call("asked")
    assert (call.approval, call.reason, call.done) == ("denied", "not now", False)
    assert chat.current.waiting_call() is call  # denied, its failure not recorded yet
    chat.fail_tool(response_id, "asked", "denied: not now", 0.0)
    assert chat.current.waiting_call() is None
    chat.complete_response(response_id, "m", "stop", {}, {})
    with pytest.raises(AlreadyDecidedError):
        chat.decide_tool("asked", True, None, "alice")
