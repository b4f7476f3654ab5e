"""Event-to-row functions: how each ``ChatSession`` event changes the views.

Each handler changes ``Rows`` (``batch``): the views updater applies a run of events to a
``Batch`` over one write transaction, and ``LiveRows`` applies one chat's live events to rows
in memory, with the same handlers, so that a follower gets a finished turn's messages exactly
as the views will hold them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..events.domain import DEFAULT_TITLE, ChatSession, auto_title, ending_status
from ..events.tree import LINE
from .batch import SEP, Rows
from .rows import ChatRow, JSONObject, MessageRow

PREVIEW_CHARS = 120


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


class Unseen:
    """The ``RowSource`` of ``LiveRows``: nothing before the follower joined is known."""

    def chat(self, chat_id: str) -> ChatRow | None:
        return None

    def message(self, chat_id: str, seq: int) -> MessageRow | None:
        return None


class LiveRows:
    """One chat's rows built in memory from its live events, with the views' own handlers
    and no database: a follower gets a finished turn's messages, exactly as the views will
    hold them, without waiting for the views. Rows it did not see begin (a follower that
    joined mid-turn) are missing, and ``turn()`` says so."""

    def __init__(self, chat_id: str, owner: str) -> None:
        self.rows = Rows(Unseen(), counting=False)  # no stats here: only the rows
        self.rows.chats[chat_id] = ChatRow(chat_id, owner, "", "", "", None)

    def apply(self, event: object) -> None:
        try:
            apply(self.rows, event)
        except LookupError:
            pass  # its message began before this follower joined
        self.rows.search.clear()

    def turn(self, reply_to_seq: int, response_id: str, ended_seq: int) -> list[MessageRow] | None:
        """The user message and the answer of a turn that ended at ``ended_seq``, as the
        views will hold them (None if either was not seen); rows up to ``ended_seq`` are
        then forgotten."""
        user = answer = None
        for (_, seq), row in self.rows.messages.items():
            if seq == reply_to_seq and row.role == "user":
                user = row
            elif row.response_id == response_id:
                answer = row
        self.rows.messages = {k: r for k, r in self.rows.messages.items() if k[1] > ended_seq}
        return None if user is None or answer is None else [user.stored(), answer.stored()]


# -- event handlers -------------------------------------------------------------------


def on_started(b: Rows, e: ChatSession.Started, chat_id: str, at: str) -> None:
    row = b.chats[chat_id] = ChatRow(chat_id, e.owner, e.title, at, at, e.model)
    b.count(row, "chats")


def on_renamed(b: Rows, e: ChatSession.Renamed, chat_id: str, at: str) -> None:
    b.chat(chat_id).title = e.title


def on_model_changed(b: Rows, e: ChatSession.ModelChanged, chat_id: str, at: str) -> None:
    b.chat(chat_id).model = e.model


def on_changed(b: Rows, e: ChatSession.Event, chat_id: str, at: str) -> None:
    """A change the views do not show (the system prompt): the chat's activity only."""
    b.chat(chat_id)


def on_message(b: Rows, e: ChatSession.MessageReceived, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    seq = e.originator_version
    if chat.message_count == 0 and chat.title == DEFAULT_TITLE:  # as the aggregate does
        chat.title = auto_title(e.text)
    parent = chat.leaf_seq if e.parent_seq == LINE else e.parent_seq
    b.messages[(chat_id, seq)] = MessageRow(chat_id, seq, "user", e.text, at,
                                            client_message_id=e.client_message_id,
                                            model=e.model,  # the model it asked for, if any
                                            parent_seq=parent)
    _move_leaf(chat, seq)
    chat.message_count += 1
    chat.last_message_preview = e.text[:PREVIEW_CHARS]
    b.search.append((e.text, chat.owner, chat_id, seq, "user"))
    b.count(chat, "messages")


def on_response_started(b: Rows, e: ChatSession.ResponseStarted, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    seq = e.originator_version
    b.messages[(chat_id, seq)] = MessageRow(
        chat_id, seq, "assistant", "", at, response_id=e.response_id, status="streaming",
        model=e.model, tool_calls=[], parent_seq=e.reply_to_seq,
    )
    if chat.leaf_seq == e.reply_to_seq:
        chat.leaf_seq = seq
    chat.current_seq = seq
    chat.message_count += 1
    asked = b.messages.get((chat_id, e.reply_to_seq)) or b.source.message(chat_id, e.reply_to_seq)
    if chat.model is None and (asked is None or asked.model is None):
        chat.model = e.model  # the chat's model, not one a message asked for itself
    b.count(chat, "messages")


def _move_leaf(chat: ChatRow, seq: int) -> None:
    """The active branch now ends at ``seq``; a chat whose views were made before the tree
    (messages, no leaf) keeps reading as one line until the views are rebuilt."""
    if chat.leaf_seq is not None or chat.message_count == 0:
        chat.leaf_seq = seq


def on_regenerated(b: Rows, e: ChatSession.Regenerated, chat_id: str, at: str) -> None:
    _move_leaf(b.chat(chat_id), e.message_seq)


def on_branch_selected(b: Rows, e: ChatSession.BranchSelected, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    _move_leaf(chat, e.leaf_seq)
    text = b.message(chat_id, e.leaf_seq).text()
    if text:
        chat.last_message_preview = text[:PREVIEW_CHARS]


def on_forked(b: Rows, e: ChatSession.Forked, chat_id: str, at: str) -> None:
    b.chat(chat_id).forked_from = {"chat_id": e.chat_id, "seq": e.seq, "hash": e.hash}


def on_message_copied(b: Rows, e: ChatSession.MessageCopied, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    seq = e.originator_version
    model = e.source.get("model")
    row = b.messages[(chat_id, seq)] = MessageRow(
        chat_id, seq, e.role, e.text, at, model=model if isinstance(model, str) else None,
        parent_seq=chat.leaf_seq)
    if e.role == "assistant":
        row.status, row.tool_calls = "complete", []
    _move_leaf(chat, seq)
    chat.message_count += 1
    chat.last_message_preview = e.text[:PREVIEW_CHARS] or chat.last_message_preview
    b.search.append((e.text, chat.owner, chat_id, seq, e.role))
    b.count(chat, "messages")


def on_tokens(b: Rows, e: ChatSession.TokensGenerated, chat_id: str, at: str) -> None:
    b.current(b.chat(chat_id)).parts.append(e.text)


def on_tool_invoked(b: Rows, e: ChatSession.ToolInvoked, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    message = b.current(chat)
    calls = message.tool_calls if message.tool_calls is not None else []
    calls.append({"call_id": e.call_id, "tool": e.tool, "arguments": e.arguments,
                  "result": None, "error": None, "duration_ms": None})
    message.tool_calls = calls
    b.count(chat, "tool_calls")
    b.count(chat, f"tool{SEP}{e.tool}{SEP}calls")


def _tool_ended(b: Rows, chat_id: str, call_id: str, duration_ms: float, **changes: Any) -> None:
    chat = b.chat(chat_id)
    for call in b.current(chat).tool_calls or []:
        if call["call_id"] == call_id:
            call.update(changes, duration_ms=duration_ms)
            tool = call["tool"]
            b.count(chat, f"tool{SEP}{tool}{SEP}duration_us", round(duration_ms * 1000))
            b.count(chat, f"tool{SEP}{tool}{SEP}timed")
            if "error" in changes:
                b.count(chat, "tool_errors")
                b.count(chat, f"tool{SEP}{tool}{SEP}errors")


def on_tool_completed(b: Rows, e: ChatSession.ToolCompleted, chat_id: str, at: str) -> None:
    _tool_ended(b, chat_id, e.call_id, e.duration_ms, result=e.result)


def on_tool_failed(b: Rows, e: ChatSession.ToolFailed, chat_id: str, at: str) -> None:
    _tool_ended(b, chat_id, e.call_id, e.duration_ms, error=e.error)


def on_response_ended(b: Rows, e: ChatSession.ResponseEnded, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    message = b.current(chat)
    requested = message.model or "unknown"  # as started (the answering model's name follows)
    chat.current_seq = None
    message.status = ending_status(e)
    if isinstance(e, ChatSession.ResponseCompleted):
        message.model = e.model
        message.finish_reason = e.finish_reason
    if isinstance(e, ChatSession.ResponseFailed):
        message.error = e.error
    if isinstance(e, ChatSession.ResponseInterrupted):
        message.error = {"code": "interrupted", "message": e.reason}
    message.usage = _usage(getattr(e, "usage", None))
    message.timing = getattr(e, "timing", None)
    text = message.text()
    if text:
        chat.last_message_preview = text[:PREVIEW_CHARS]
        b.search.append((text, chat.owner, chat_id, message.seq, "assistant"))
    _count_response(b, chat, message)
    b.use(chat, at[:10], requested, _tokens(message.usage))


def _tokens(usage: JSONObject | None) -> dict[str, int]:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: int((usage or {}).get(k) or 0) for k in keys}


def _usage(usage: object) -> JSONObject | None:
    """The three token counts, and, as the log has them, ``estimated`` (the server sent no
    usage, or the stream was cut) and ``server_timings`` (llama.cpp's, Ollama's)."""
    if not isinstance(usage, dict):
        return None
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    shown: JSONObject = {k: int(usage.get(k) or 0) for k in keys}
    if usage.get("estimated"):
        shown["estimated"] = True
    if isinstance(usage.get("server_timings"), dict) and usage["server_timings"]:
        shown["server_timings"] = usage["server_timings"]
    return shown


def _count_response(b: Rows, chat: ChatRow, message: MessageRow) -> None:
    model = message.model or "unknown"
    usage = message.usage or {}
    b.count(chat, "responses")
    b.count(chat, f"model{SEP}{model}{SEP}responses")
    if message.status == "failed":
        b.count(chat, "failed_responses")
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        tokens = usage.get(key, 0)
        setattr(chat, key, getattr(chat, key) + tokens)
        b.count(chat, key, tokens)
    b.count(chat, f"model{SEP}{model}{SEP}total_tokens", usage.get("total_tokens", 0))
    timing = message.timing if isinstance(message.timing, dict) else {}
    b.sample(chat, "latency_ms", timing.get("duration_ms"))
    b.sample(chat, "ttft_ms", timing.get("ttft_ms"), model=model)
    tps = timing.get("tokens_per_second")
    if isinstance(tps, int | float):
        b.sample(chat, "tokens_per_second", tps)
        b.count(chat, "tps_milli", round(tps * 1000))
        b.count(chat, "tps_count")


#: (rows, event, chat id, the event's time): each takes the one event type it is listed for
Handler = Callable[[Rows, Any, str, str], None]

HANDLERS: dict[type[Any], Handler] = {
    ChatSession.Started: on_started,
    ChatSession.Renamed: on_renamed,
    ChatSession.ModelChanged: on_model_changed,
    ChatSession.SystemPromptChanged: on_changed,
    ChatSession.MessageReceived: on_message,
    ChatSession.Regenerated: on_regenerated,
    ChatSession.BranchSelected: on_branch_selected,
    ChatSession.Forked: on_forked,
    ChatSession.MessageCopied: on_message_copied,
    ChatSession.ResponseStarted: on_response_started,
    ChatSession.TokensGenerated: on_tokens,
    ChatSession.ToolInvoked: on_tool_invoked,
    ChatSession.ToolCompleted: on_tool_completed,
    ChatSession.ToolFailed: on_tool_failed,
    ChatSession.ResponseCompleted: on_response_ended,
    ChatSession.ResponseFailed: on_response_ended,
    ChatSession.ResponseStopped: on_response_ended,
    ChatSession.ResponseInterrupted: on_response_ended,
}


def apply(batch: Rows, event: Any) -> None:
    """Applies one domain event; events of unknown types (and snapshots) change nothing."""
    handler = HANDLERS.get(type(event))
    if handler is not None:
        chat_id = str(event.originator_id)
        at = iso(event.timestamp)
        handler(batch, event, chat_id, at)
        chat = batch.chats.get(chat_id)
        if chat is not None:
            chat.updated_at = at
