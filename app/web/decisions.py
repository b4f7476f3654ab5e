"""A person's decision on a tool call that waits for approval, as the WebSocket's
``tool_decision`` frame and ``POST /chat/{id}/tool-decision`` both take it.

The decision goes to the chat's actor, which records it (``ToolDecided``: approve, reason,
who) and wakes the waiting turn. The first decision wins: a later one is refused with
``already_decided`` (409), a call that waits for none with ``tool_call_not_found`` (404).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from .schemas import MAX_ID, Text
from .services import Services

#: Longest reason a decision may give (code points).
MAX_REASON = 500


class ToolDecision(BaseModel):
    """The body of ``POST /chat/{id}/tool-decision``."""

    model_config = ConfigDict(extra="forbid")

    call_id: Text = Field(min_length=1, max_length=MAX_ID)
    approve: StrictBool
    reason: Text | None = Field(None, max_length=MAX_REASON)


class ToolDecisionFrame(ToolDecision):
    """The ``tool_decision`` frame: the body, with its chat."""

    model_config = ConfigDict(extra="ignore")

    chat_id: UUID


class Decided(BaseModel):
    """The answer: the decision as recorded, at ``seq``."""

    chat_id: UUID
    call_id: str
    approve: bool
    reason: str | None
    seq: int


async def decide(svc: Services, owner: str, chat_id: UUID,
                 decision: ToolDecision) -> dict[str, Any]:
    """Records ``owner``'s decision; raises ``ChatNotFoundError``, ``ToolCallNotFoundError``,
    ``AlreadyDecidedError`` or a store or actor error (the caller maps them)."""
    await svc.require_chat(owner, chat_id)
    seq = await svc.system.decide_tool(chat_id, owner, decision.call_id, decision.approve,
                                       decision.reason)
    return {"chat_id": str(chat_id), "call_id": decision.call_id,
            "approve": decision.approve, "reason": decision.reason, "seq": seq}
