"""The views' rows, mapped by name in one place.

``ChatRow`` and ``MessageRow`` are the rows of ``view_chats`` and ``view_messages``: their
fields are the tables' columns (``COLUMNS``, in the order of ``SELECT_*``), read with
``from_row`` and written with ``to_row`` (``MessageRow`` keeps usage, timing, tool calls
and error as JSON text). ``chat_dict`` and ``message_dict`` give them the contract's shape.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NotRequired, TypedDict

from ..events.text import text_problem
from ..storage.sql import Row

#: A JSON object as the log gives it (usage, timing, an error, a tool call's arguments).
JSONObject = dict[str, Any]


class TokenCounts(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatDict(TypedDict):
    """A chat, as the contract has it."""

    id: str
    title: str
    created_at: str
    updated_at: str
    model: str | None
    message_count: int
    usage: TokenCounts
    last_message_preview: str | None
    #: A fork's origin: ``{"chat_id", "seq", "hash"}``.
    forked_from: NotRequired[JSONObject]


class MessageDict(TypedDict):
    """A message, as the contract has it: a user message has no response fields."""

    seq: int
    role: str
    content: str
    created_at: str
    client_message_id: NotRequired[str]
    response_id: NotRequired[str | None]
    status: NotRequired[str | None]
    model: NotRequired[str | None]
    usage: NotRequired[JSONObject | None]
    timing: NotRequired[JSONObject | None]
    tool_calls: NotRequired[list[JSONObject]]
    error: NotRequired[JSONObject | None]
    finish_reason: NotRequired[str | None]
    #: The message it follows (None: a first message).
    parent_seq: int | None
    #: Its alternatives, itself included, oldest first.
    siblings: list[int]


def _columns(cls: type[object], *, skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in skip)  # type: ignore[arg-type]


@dataclass(slots=True)
class ChatRow:
    """A row of ``view_chats``."""

    COLUMNS: ClassVar[tuple[str, ...]]
    SELECT: ClassVar[str]

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
    #: The last message of the active branch (None: no message yet, or views made before
    #: the tree: read as one line until rebuilt).
    leaf_seq: int | None = None
    forked_from: JSONObject | None = None

    @classmethod
    def from_row(cls, row: Row) -> ChatRow:
        (chat_id, owner, title, created_at, updated_at, model, message_count, prompt_tokens,
         completion_tokens, total_tokens, preview, current_seq, leaf_seq, forked_from) = row
        return cls(chat_id, owner, title, created_at, updated_at, model, message_count,
                   prompt_tokens, completion_tokens, total_tokens, preview, current_seq,
                   leaf_seq, _load(forked_from))

    def to_row(self) -> Row:
        return (self.chat_id, self.owner, self.title, self.created_at, self.updated_at,
                self.model, self.message_count, self.prompt_tokens, self.completion_tokens,
                self.total_tokens, self.last_message_preview, self.current_seq, self.leaf_seq,
                _dump(self.forked_from))


@dataclass(slots=True)
class MessageRow:
    """A row of ``view_messages``; ``parts`` is streamed text not yet joined to ``content``."""

    COLUMNS: ClassVar[tuple[str, ...]]
    SELECT: ClassVar[str]

    chat_id: str
    seq: int
    role: str
    content: str
    created_at: str
    client_message_id: str | None = None
    response_id: str | None = None
    status: str | None = None
    model: str | None = None
    usage: JSONObject | None = None
    timing: JSONObject | None = None
    tool_calls: list[JSONObject] | None = None
    error: JSONObject | None = None
    finish_reason: str | None = None
    parent_seq: int | None = None
    parts: list[str] = field(default_factory=list)

    def text(self) -> str:
        if self.parts:
            self.content += "".join(self.parts)
            self.parts.clear()
        return self.content

    @classmethod
    def from_row(cls, row: Row) -> MessageRow:
        (chat_id, seq, role, content, created_at, client_message_id, response_id, status,
         model, usage, timing, tool_calls, error, finish_reason, parent_seq) = row
        return cls(chat_id, seq, role, content, created_at, client_message_id, response_id,
                   status, model, _load(usage), _load(timing), _load(tool_calls), _load(error),
                   finish_reason, parent_seq)

    def to_row(self) -> Row:
        return (self.chat_id, self.seq, self.role, self.text(), self.created_at,
                self.client_message_id, self.response_id, self.status, self.model,
                _dump(self.usage), _dump(self.timing), _dump(self.tool_calls), _dump(self.error),
                self.finish_reason, self.parent_seq)

    def stored(self) -> MessageRow:
        """A copy of this row exactly as the views hold it (JSON values through JSON)."""
        return MessageRow.from_row(self.to_row())


ChatRow.COLUMNS = _columns(ChatRow)
ChatRow.SELECT = f"SELECT {', '.join(ChatRow.COLUMNS)} FROM view_chats"
MessageRow.COLUMNS = _columns(MessageRow, skip=("parts",))
MessageRow.SELECT = f"SELECT {', '.join(MessageRow.COLUMNS)} FROM view_messages"


def chat_dict(row: ChatRow) -> ChatDict:
    chat: ChatDict = {
        "id": row.chat_id, "title": row.title, "created_at": row.created_at,
        "updated_at": row.updated_at, "model": row.model, "message_count": row.message_count,
        "usage": {"prompt_tokens": row.prompt_tokens,
                  "completion_tokens": row.completion_tokens,
                  "total_tokens": row.total_tokens},
        "last_message_preview": row.last_message_preview,
    }
    if row.forked_from is not None:
        chat["forked_from"] = row.forked_from
    return chat


def message_dict(row: MessageRow, siblings: list[int] | None = None) -> MessageDict:
    """The message as the contract has it; ``siblings`` default to the message alone."""
    alternatives = siblings or [row.seq]
    if row.role == "user":
        message: MessageDict = {"seq": row.seq, "role": row.role, "content": row.content,
                                "created_at": row.created_at, "parent_seq": row.parent_seq,
                                "siblings": alternatives}
        if row.client_message_id is not None:
            message["client_message_id"] = row.client_message_id
        if row.model is not None:
            message["model"] = row.model  # the model it asked to be answered by
        return message
    return {
        "seq": row.seq, "role": row.role, "content": row.content, "created_at": row.created_at,
        "response_id": row.response_id, "status": row.status, "model": row.model,
        "usage": row.usage, "timing": row.timing, "tool_calls": row.tool_calls or [],
        "error": row.error, "finish_reason": row.finish_reason,
        "parent_seq": row.parent_seq, "siblings": alternatives,
    }


def _dump(value: object) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def chat_cursor(row: ChatRow) -> str:
    """The cursor of the chat-list page that follows ``row`` (its activity time and id)."""
    raw = json.dumps([row.updated_at, row.chat_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor_position(cursor: str | None) -> list[str] | None:
    """The (activity time, chat id) a cursor stands for; None for none or a malformed one."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, str) and text_problem(v) is None for v in value)):
        return value
    return None
