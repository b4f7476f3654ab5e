"""Event-to-row functions: how each ``ChatSession`` event changes the views.

A ``Batch`` works on one write transaction. Rows it touches are loaded once, changed in
memory (so a run of ``TokensGenerated`` costs one string append each) and written back with
one ``executemany`` per table when the batch is flushed; counters and sketch buckets are
summed in memory and added to their rows. The caller commits the flush and the tracking
position together, which is what makes the views exactly once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..events.domain import DEFAULT_TITLE, ChatSession, auto_title
from ..events.text import clean_text
from ..storage.sql import Tx
from . import sketch

PREVIEW_CHARS = 120
SEP = "\x1f"  # separates the parts of scope and counter names; never in user text we key on


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(slots=True)
class ChatRow:
    chat_id: str
    owner: str
    title: str
    created_at: str
    updated_at: str
    model: str | None
    message_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    last_message_preview: str | None = None
    current_seq: int | None = None

    def as_row(self) -> tuple[Any, ...]:
        return (self.chat_id, self.owner, self.title, self.created_at, self.updated_at,
                self.model, self.message_count, self.prompt_tokens, self.completion_tokens,
                self.total_tokens, self.last_message_preview, self.current_seq)


@dataclass(slots=True)
class MessageRow:
    chat_id: str
    seq: int
    role: str
    content: str
    created_at: str
    client_message_id: str | None = None
    response_id: str | None = None
    status: str | None = None
    model: str | None = None
    usage: Any = None
    timing: Any = None
    tool_calls: list[dict[str, Any]] | None = None
    error: Any = None
    finish_reason: str | None = None
    parts: list[str] = field(default_factory=list)  # streamed text not yet joined

    def text(self) -> str:
        if self.parts:
            self.content += "".join(self.parts)
            self.parts.clear()
        return self.content

    def as_row(self) -> tuple[Any, ...]:
        return (self.chat_id, self.seq, self.role, self.text(), self.created_at,
                self.client_message_id, self.response_id, self.status, self.model,
                _dump(self.usage), _dump(self.timing), _dump(self.tool_calls), _dump(self.error),
                self.finish_reason)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)


CHAT_COLUMNS = ("chat_id, owner, title, created_at, updated_at, model, message_count,"
                " prompt_tokens, completion_tokens, total_tokens, last_message_preview,"
                " current_seq")
MESSAGE_COLUMNS = ("chat_id, seq, role, content, created_at, client_message_id, response_id,"
                   " status, model, usage, timing, tool_calls, error, finish_reason")


@dataclass(frozen=True)
class Upsert:
    """An ``INSERT ... ON CONFLICT`` of many rows: ``executemany`` on SQLite, one statement
    over ``unnest``ed column arrays on PostgreSQL (one round trip per table and batch)."""

    table: str
    columns: tuple[str, ...]
    pg_types: tuple[str, ...]
    on_conflict: str

    def write(self, tx: Tx, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        # Events recorded before the text rules (``app.events.text``) may hold characters
        # that the databases refuse: the views hold them as U+FFFD.
        rows = [tuple(clean_text(v) if type(v) is str else v for v in row) for row in rows]
        names = ", ".join(self.columns)
        if tx.postgres:
            arrays = ", ".join(f"%b::{t}[]" for t in self.pg_types)  # binary: no escaping
            tx.run(f"INSERT INTO {self.table} ({names}) SELECT * FROM unnest({arrays})"
                   f" {self.on_conflict}", [list(column) for column in zip(*rows, strict=True)])
        else:
            marks = ", ".join("?" for _ in self.columns)
            tx.many(f"INSERT INTO {self.table} ({names}) VALUES ({marks}) {self.on_conflict}",
                    rows)


def _replace(table: str, columns: str, pg_types: str, key: str) -> Upsert:
    names = tuple(c.strip() for c in columns.split(","))
    keys = {k.strip() for k in key.split(",")}
    updates = ", ".join(f"{c} = excluded.{c}" for c in names if c not in keys)
    return Upsert(table, names, tuple(pg_types.split()),
                  f"ON CONFLICT ({key}) DO UPDATE SET {updates}")


UPSERT_CHAT = _replace("view_chats", CHAT_COLUMNS,
                       "text text text text text text int int8 int8 int8 text int", "chat_id")
UPSERT_MESSAGE = _replace("view_messages", MESSAGE_COLUMNS,
                          "text int text text text text text text text text text text text text",
                          "chat_id, seq")
ADD_COUNTER = Upsert("view_counters", ("scope", "name", "value"), ("text", "text", "int8"),
                     "ON CONFLICT (scope, name)"
                     " DO UPDATE SET value = view_counters.value + excluded.value")
ADD_BUCKET = Upsert("view_sketches", ("scope", "metric", "bucket", "count"),
                    ("text", "text", "int", "int8"),
                    "ON CONFLICT (scope, metric, bucket)"
                    " DO UPDATE SET count = view_sketches.count + excluded.count")
INSERT_SEARCH = Upsert("view_search", ("content", "owner", "chat_id", "seq", "role"),
                       ("text", "text", "text", "int", "text"), "")


def chat_scope(chat_id: str) -> str:
    return f"chat{SEP}{chat_id}"


def user_scope(owner: str) -> str:
    return f"user{SEP}{owner}"


def model_scope(scope: str, model: str) -> str:
    return f"{scope}{SEP}model{SEP}{model}"


class Batch:
    """The changes of a run of events, applied to ``tx`` by ``flush()``."""

    def __init__(self, tx: Tx) -> None:
        self.tx = tx
        self.chats: dict[str, ChatRow] = {}
        self.messages: dict[tuple[str, int], MessageRow] = {}
        self.search: list[tuple[str, str, str, int, str]] = []
        self.counters: Counter[tuple[str, str]] = Counter()
        self.buckets: Counter[tuple[str, str, int]] = Counter()

    # -- rows --------------------------------------------------------------------------

    def chat(self, chat_id: str) -> ChatRow:
        row = self.chats.get(chat_id)
        if row is None:
            found = self.tx.one(f"SELECT {CHAT_COLUMNS} FROM view_chats WHERE chat_id = ?",
                                (chat_id,))
            if found is None:
                raise LookupError(f"chat {chat_id} has no Started event before this one")
            row = self.chats[chat_id] = ChatRow(*found)
        return row

    def message(self, chat_id: str, seq: int) -> MessageRow:
        row = self.messages.get((chat_id, seq))
        if row is None:
            found = self.tx.one(
                f"SELECT {MESSAGE_COLUMNS} FROM view_messages WHERE chat_id = ? AND seq = ?",
                (chat_id, seq),
            )
            if found is None:
                raise LookupError(f"message {seq} of chat {chat_id} is missing")
            values = list(found)
            for i in (9, 10, 11, 12):
                values[i] = _load(values[i])
            row = self.messages[(chat_id, seq)] = MessageRow(*values)
        return row

    def current(self, chat: ChatRow) -> MessageRow:
        if chat.current_seq is None:
            raise LookupError(f"chat {chat.chat_id} has no response in progress")
        return self.message(chat.chat_id, chat.current_seq)

    # -- stats -------------------------------------------------------------------------

    def count(self, chat: ChatRow, name: str, value: int = 1) -> None:
        for scope in ("all", user_scope(chat.owner), chat_scope(chat.chat_id)):
            self.counters[(scope, name)] += value

    def sample(self, chat: ChatRow, metric: str, value: Any, model: str | None = None) -> None:
        if not isinstance(value, int | float):
            return
        bucket = sketch.bucket_of(float(value))
        for scope in ("all", user_scope(chat.owner), chat_scope(chat.chat_id)):
            self.buckets[(scope, metric, bucket)] += 1
            if model is not None:
                self.buckets[(model_scope(scope, model), metric, bucket)] += 1

    def flush(self) -> None:
        tx = self.tx
        UPSERT_CHAT.write(tx, [row.as_row() for row in self.chats.values()])
        UPSERT_MESSAGE.write(tx, [row.as_row() for row in self.messages.values()])
        INSERT_SEARCH.write(tx, list(self.search))
        ADD_COUNTER.write(tx, [(s, n, v) for (s, n), v in self.counters.items() if v])
        ADD_BUCKET.write(tx, [(s, m, b, c) for (s, m, b), c in self.buckets.items()])


class LiveRows(Batch):
    """One chat's rows built in memory from its live events, with the views' own handlers
    and no database: a follower gets a finished turn's messages, exactly as the views will
    hold them, without waiting for the views. Rows it did not see begin (a follower that
    joined mid-turn) are missing, and ``turn()`` says so."""

    def __init__(self, chat_id: str, owner: str) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.chats[chat_id] = ChatRow(chat_id, owner, "", "", "", None)

    def chat(self, chat_id: str) -> ChatRow:
        return self.chats[chat_id]

    def message(self, chat_id: str, seq: int) -> MessageRow:
        row = self.messages.get((chat_id, seq))
        if row is None:
            raise LookupError(f"message {seq} was not seen")
        return row

    def count(self, chat: ChatRow, name: str, value: int = 1) -> None:
        pass  # no stats here: only the rows

    def sample(self, chat: ChatRow, metric: str, value: Any, model: str | None = None) -> None:
        pass

    def apply(self, event: Any) -> None:
        try:
            apply(self, event)
        except LookupError:
            pass  # its message began before this follower joined
        self.search.clear()

    def turn(self, reply_to_seq: int, response_id: str, ended_seq: int) -> list[MessageRow] | None:
        """The user message and the answer of a turn that ended at ``ended_seq`` (None if
        either was not seen); rows up to ``ended_seq`` are then forgotten."""
        user = answer = None
        for (_, seq), row in self.messages.items():
            if seq == reply_to_seq and row.role == "user":
                user = row
            elif row.response_id == response_id:
                answer = row
        self.messages = {k: r for k, r in self.messages.items() if k[1] > ended_seq}
        return None if user is None or answer is None else [user, answer]


# -- event handlers -------------------------------------------------------------------


def on_started(b: Batch, e: ChatSession.Started, chat_id: str, at: str) -> None:
    row = b.chats[chat_id] = ChatRow(chat_id, e.owner, e.title, at, at, e.model)
    b.count(row, "chats")


def on_renamed(b: Batch, e: ChatSession.Renamed, chat_id: str, at: str) -> None:
    b.chat(chat_id).title = e.title


def on_message(b: Batch, e: ChatSession.MessageReceived, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    seq = e.originator_version
    if chat.message_count == 0 and chat.title == DEFAULT_TITLE:  # as the aggregate does
        chat.title = auto_title(e.text)
    b.messages[(chat_id, seq)] = MessageRow(chat_id, seq, "user", e.text, at,
                                            client_message_id=e.client_message_id)
    chat.message_count += 1
    chat.last_message_preview = e.text[:PREVIEW_CHARS]
    b.search.append((e.text, chat.owner, chat_id, seq, "user"))
    b.count(chat, "messages")


def on_response_started(b: Batch, e: ChatSession.ResponseStarted, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    seq = e.originator_version
    b.messages[(chat_id, seq)] = MessageRow(
        chat_id, seq, "assistant", "", at, response_id=e.response_id, status="streaming",
        model=e.model, tool_calls=[],
    )
    chat.current_seq = seq
    chat.message_count += 1
    if chat.model is None:
        chat.model = e.model
    b.count(chat, "messages")


def on_tokens(b: Batch, e: ChatSession.TokensGenerated, chat_id: str, at: str) -> None:
    b.current(b.chat(chat_id)).parts.append(e.text)


def on_tool_invoked(b: Batch, e: ChatSession.ToolInvoked, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    message = b.current(chat)
    calls = message.tool_calls if message.tool_calls is not None else []
    calls.append({"call_id": e.call_id, "tool": e.tool, "arguments": e.arguments,
                  "result": None, "error": None, "duration_ms": None})
    message.tool_calls = calls
    b.count(chat, "tool_calls")
    b.count(chat, f"tool{SEP}{e.tool}{SEP}calls")


def _tool_ended(b: Batch, chat_id: str, call_id: str, duration_ms: float, **changes: Any) -> None:
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


def on_tool_completed(b: Batch, e: ChatSession.ToolCompleted, chat_id: str, at: str) -> None:
    _tool_ended(b, chat_id, e.call_id, e.duration_ms, result=e.result)


def on_tool_failed(b: Batch, e: ChatSession.ToolFailed, chat_id: str, at: str) -> None:
    _tool_ended(b, chat_id, e.call_id, e.duration_ms, error=e.error)


def on_response_ended(b: Batch, e: ChatSession.ResponseEnded, chat_id: str, at: str) -> None:
    chat = b.chat(chat_id)
    message = b.current(chat)
    chat.current_seq = None
    name = type(e).__name__
    message.status = {"ResponseCompleted": "complete", "ResponseFailed": "failed",
                      "ResponseStopped": "stopped"}.get(name, "interrupted")
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


def _usage(usage: Any) -> dict[str, Any] | None:
    """The three token counts, and, as the log has them, ``estimated`` (the server sent no
    usage, or the stream was cut) and ``server_timings`` (llama.cpp's, Ollama's)."""
    if not isinstance(usage, dict):
        return None
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    shown: dict[str, Any] = {k: int(usage.get(k) or 0) for k in keys}
    if usage.get("estimated"):
        shown["estimated"] = True
    if isinstance(usage.get("server_timings"), dict) and usage["server_timings"]:
        shown["server_timings"] = usage["server_timings"]
    return shown


def _count_response(b: Batch, chat: ChatRow, message: MessageRow) -> None:
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


Handler = Callable[[Batch, Any, str, str], None]

HANDLERS: dict[type[Any], Handler] = {
    ChatSession.Started: on_started,
    ChatSession.Renamed: on_renamed,
    ChatSession.MessageReceived: on_message,
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


def apply(batch: Batch, event: Any) -> None:
    """Applies one domain event; events of unknown types (and snapshots) change nothing."""
    handler = HANDLERS.get(type(event))
    if handler is not None:
        chat_id = str(event.originator_id)
        at = iso(event.timestamp)
        handler(batch, event, chat_id, at)
        chat = batch.chats.get(chat_id)
        if chat is not None:
            chat.updated_at = at
