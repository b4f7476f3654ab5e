"""One client's view of one chat: live items in, wire frames out.

A ``ChatFeed`` turns what a subscription yields (stored ``ChatSession`` events and live
``TokenDelta``s) into the frames of the contract, the same for the WebSocket and for SSE:

* text arrives twice (live deltas, then the persisted ``TokensGenerated`` batches), so every
  piece is cut against the count of characters already sent for its response: each
  character of a reply goes out exactly once, at its ``offset``;
* a response's end gives the ``done`` frame at once, then (the views having caught up)
  ``backend_status`` and the turn's ``chat_history``.

``open_feed`` subscribes first and reads the history after, up to the subscription's
``last_seq``, so that nothing falls between history and live items.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Any
from uuid import UUID

from ..actors.messages import Accepted, LiveItem, LiveState, TokenDelta
from ..events.domain import ChatSession, ending_status
from ..events.errors import ChatDeletedError
from ..projections.projector import LiveRows
from ..projections.rows import MessageDict, message_dict

if TYPE_CHECKING:
    from ..actors.hub import Subscription
    from .services import Services

Frame = dict[str, Any]
ToolEvent = ChatSession.ToolInvoked | ChatSession.ToolCompleted | ChatSession.ToolFailed
HISTORY_PAGE = 100
#: ``finish_reason`` of a response that did not complete with one from the model.
FINISH_REASONS = {"complete": "stop", "failed": "error", "stopped": "stopped",
                  "interrupted": "interrupted"}


class ChatFeed:
    def __init__(self, services: Services, owner: str, chat_id: UUID) -> None:
        self.services = services
        self.owner = owner
        self.chat_id = chat_id
        self.cid = str(chat_id)
        self.sent: dict[str, int] = {}  # response_id -> characters sent
        self.texts: dict[str, str] = {}  # response_id -> text sent
        self.replies: dict[str, int] = {}  # response_id -> seq of the user message it answers
        self.tools: dict[str, str] = {}  # call_id -> tool name
        self.rows = LiveRows(self.cid, owner)  # the running turn's messages, as the views'
        #: Edits seen live: their siblings are read from the views, which know them all.
        self.edits: set[int] = set()

    # -- joining ----------------------------------------------------------------------------

    async def history(self, state: LiveState, after_seq: int | None) -> Frame:
        """The ``chat_history`` frame for a new follower: after ``after_seq`` or the latest page."""
        await self.services.caught_up()
        views = self.services.views
        if after_seq is not None:
            messages, more = await views.messages(self.owner, self.chat_id, HISTORY_PAGE,
                                                  after_seq=after_seq)
        else:
            messages, more = await views.messages(self.owner, self.chat_id, HISTORY_PAGE)
        # newer ones than the subscription's start reach the follower live
        messages = [m for m in messages if m["seq"] <= state.last_seq]
        return self._history_frame(messages, more, state.last_seq)

    def in_progress(self, state: LiveState) -> list[Frame]:
        """The text so far of a running response, as one delta from offset 0."""
        response = state.response
        if response is None:
            return []
        self.replies[response.response_id] = response.reply_to_seq
        self.sent.setdefault(response.response_id, 0)
        self.texts.setdefault(response.response_id, "")
        frames = self._text(response.response_id, response.text, 0)
        return frames + [self._approval(response.response_id, wait.call_id, wait.tool,
                                        wait.arguments) for wait in response.approvals]

    # -- live -------------------------------------------------------------------------------

    async def frames(self, item: LiveItem) -> AsyncGenerator[Frame, None]:
        """The frames for one live item (none for bookkeeping events).

        A response's end yields its ``done`` frame at once, before waiting for the views.
        The chat's deletion raises ``ChatDeletedError`` (the follow ends with an error frame).
        """
        if isinstance(item, TokenDelta):
            for frame in self._text(item.response_id, item.text, item.offset):
                yield frame
            return
        if isinstance(item, ChatSession.Deleted):  # the follower gets chat_not_found
            raise ChatDeletedError("chat not found")
        self.rows.apply(item)
        if isinstance(item, ChatSession.TokensGenerated):
            for frame in self._text(item.response_id, item.text, item.offset):
                yield frame
        elif isinstance(item, ChatSession.ResponseStarted):
            self.replies[item.response_id] = item.reply_to_seq
            self.sent[item.response_id], self.texts[item.response_id] = 0, ""
        elif isinstance(item, ChatSession.MessageReceived) and item.edit_of is not None:
            self.edits.add(item.originator_version)
        elif isinstance(item, ChatSession.BranchSelected):  # another branch is shown
            yield await self._branch_history(item.originator_version)
        elif isinstance(item, ToolEvent):
            yield self._tool(item)
        elif isinstance(item, ChatSession.ToolApprovalRequested):
            yield self._approval(item.response_id, item.call_id, item.tool, item.arguments)
        elif isinstance(item, ChatSession.ToolDecided):
            yield {"event": "tool_decided", "chat_id": self.cid, "response_id": item.response_id,
                   "call_id": item.call_id, "approve": item.approve, "reason": item.reason,
                   "decided_by": item.decided_by}
        elif isinstance(item, ChatSession.ResponseEnded):
            async with aclosing(self._ended(item)) as frames:
                async for frame in frames:
                    yield frame

    def _text(self, response_id: str, text: str, offset: int) -> list[Frame]:
        sent = self.sent.get(response_id, 0)
        end = offset + len(text)
        if end <= sent:
            return []  # already sent (the persisted copy of live text)
        if offset < sent:
            text, offset = text[sent - offset:], sent
        self.sent[response_id] = end
        self.texts[response_id] = self.texts.get(response_id, "") + text
        return [{"event": "ai_response", "chat_id": self.cid, "response_id": response_id,
                 "delta": text, "offset": offset, "done": False}]

    def _tool(self, item: ToolEvent) -> Frame:
        frame: Frame = {"event": "tool_activity", "chat_id": self.cid,
                        "response_id": item.response_id, "call_id": item.call_id}
        if isinstance(item, ChatSession.ToolInvoked):
            self.tools[item.call_id] = item.tool
            frame.update(tool=item.tool, status="started", arguments=item.arguments)
        elif isinstance(item, ChatSession.ToolCompleted):
            frame.update(tool=self.tools.get(item.call_id, ""), status="completed",
                         result=item.result, duration_ms=item.duration_ms)
        else:
            frame.update(tool=self.tools.get(item.call_id, ""), status="failed",
                         error=item.error, duration_ms=item.duration_ms)
        return frame

    def _approval(self, response_id: str, call_id: str, tool: str, arguments: object) -> Frame:
        return {"event": "tool_approval", "chat_id": self.cid, "response_id": response_id,
                "call_id": call_id, "tool": tool, "arguments": arguments}

    async def _ended(self, event: ChatSession.ResponseEnded) -> AsyncGenerator[Frame, None]:
        response_id, seq = event.response_id, event.originator_version
        status = ending_status(event)
        yield self._done(response_id, self.texts.pop(response_id, ""), status, seq,
                         getattr(event, "finish_reason", None))
        self.sent.pop(response_id, None)
        if isinstance(event, ChatSession.ResponseFailed):
            error = event.error or {}
            yield {"event": "error", "chat_id": self.cid, "response_id": response_id,
                   "code": error.get("code", "model_error"),
                   "message": error.get("message", "the response failed")}
        turn = await self._turn_messages(response_id, seq)
        yield self._status(response_id, turn, event)
        yield self._history_frame(turn, False, seq)

    async def outcome_frames(self, accepted: Accepted) -> list[Frame]:
        """The result of a turn that ended before a duplicate re-send asked for it."""
        outcome = accepted.outcome
        assert outcome is not None
        self.replies[outcome.response_id] = accepted.answers or accepted.seq
        turn = await self._turn_messages(outcome.response_id, outcome.seq)
        return [
            self._done(outcome.response_id, outcome.text, outcome.status, outcome.seq, None),
            self._status(outcome.response_id, turn, None),
            self._history_frame(turn, False, outcome.seq),
        ]

    def _done(self, response_id: str, text: str, status: str, seq: int,
              finish_reason: str | None) -> Frame:
        return {"event": "ai_response", "chat_id": self.cid, "response_id": response_id,
                "message": text, "done": True, "status": status,
                "finish_reason": finish_reason or FINISH_REASONS[status], "seq": seq}

    async def _turn_messages(self, response_id: str, seq: int) -> list[MessageDict]:
        """The user message and the answer of the turn that ended at ``seq``: from the live
        events when this feed saw the whole turn, else from the views once caught up."""
        first = self.replies.pop(response_id, seq)
        rows = self.rows.turn(first, response_id, seq)
        if rows is not None and first not in self.edits:
            return [message_dict(row) for row in rows]
        messages, _ = await self.page(HISTORY_PAGE, after_seq=first - 1)
        return [m for m in messages
                if m["seq"] == first or m.get("response_id") == response_id]

    async def _branch_history(self, seq: int) -> Frame:
        """The active branch's latest page, once the views include event ``seq``."""
        messages, more = await self.page(HISTORY_PAGE)
        return self._history_frame(messages, more, seq)

    async def page(self, limit: int, after_seq: int | None = None
                   ) -> tuple[list[MessageDict], bool]:
        """A page of the chat's messages (after ``after_seq``, else the latest), as the views
        hold it once they include what this feed has seen. A replay's feed reads it as it was
        at the event being replayed instead (``app.web.player``)."""
        await self.services.caught_up(chat_id=self.chat_id)
        return await self.services.views.messages(self.owner, self.chat_id, limit,
                                                  after_seq=after_seq)

    def _status(self, response_id: str, turn: list[MessageDict],
                event: ChatSession.ResponseEnded | None) -> Frame:
        answer: Mapping[str, Any] = next(
            (m for m in turn if m.get("response_id") == response_id), {})
        usage = answer.get("usage") or getattr(event, "usage", None) or {}
        timing = answer.get("timing") or getattr(event, "timing", None) or {}
        counts = self.services.system.counts()
        return {
            "event": "backend_status", "chat_id": self.cid, "response_id": response_id,
            "tokens_used": usage.get("total_tokens", 0),
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "latency_ms": timing.get("duration_ms"), "ttft_ms": timing.get("ttft_ms"),
            "tokens_per_second": timing.get("tokens_per_second"),
            "model": answer.get("model") or getattr(event, "model", None),
            "active_chats": counts["active_chats"], "queue_depth": counts["queue_depth"],
        }

    def _history_frame(self, messages: list[MessageDict], more: bool, last_seq: int) -> Frame:
        return {"event": "chat_history", "chat_id": self.cid, "messages": messages,
                "has_more": more, "last_seq": last_seq}


@asynccontextmanager
async def open_feed(
    services: Services, owner: str, chat_id: UUID
) -> AsyncIterator[tuple[ChatFeed, Subscription]]:
    """Subscribes to the chat's actor (raises ``ChatNotFoundError``) and builds its feed."""
    await services.require_chat(owner, chat_id)
    async with services.system.subscribe(chat_id, owner) as sub:
        yield ChatFeed(services, owner, chat_id), sub
