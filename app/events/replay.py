"""Reading a chat's log back: the audit trail as records, and the chat as it was at any seq.

Blocking (it reads the store directly); the CLI runs it outside any event loop and the web
layer in worker threads. Each record is ``{"seq", "type", "timestamp", "data", "hash"}``,
the shape of ``GET /chat/{id}/events``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import NotRequired, TypeAlias, TypedDict, cast
from uuid import UUID

from .application import ChatApplication
from .audit import chain_table, reading
from .domain import ChatSession
from .errors import ChatNotFoundError

#: A value as JSON writes it.
JSONValue: TypeAlias = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]


class StoredBytes(TypedDict):
    """An event as stored: what its link of the audit chain covers (docs/audit.md)."""

    topic: str
    state: str  # base64 of the stored bytes (ciphertext where encrypted)


class EventRecord(TypedDict):
    """One stored event, as ``GET /chat/{id}/events`` shows it (and, with ``stored``, as
    the JSON Lines export writes it)."""

    seq: int
    type: str
    timestamp: JSONValue
    data: dict[str, JSONValue]
    hash: str | None  # its link of the audit chain, hex
    stored: NotRequired[StoredBytes]


_ENVELOPE = {"originator_id", "originator_version", "timestamp", "originator_topic"}


def event_record(event: ChatSession.Event, digest: bytes | None = None) -> EventRecord:
    """One stored event as a JSON-able record (timestamps ISO-8601 UTC), with its link of
    the audit chain."""
    data = {k: _plain(v) for k, v in event.__dict__.items() if k not in _ENVELOPE}
    return {
        "seq": event.originator_version,
        "type": type(event).__name__,
        "timestamp": _plain(event.timestamp),
        "data": data,
        "hash": None if digest is None else digest.hex(),
    }


def chat_records(
    app: ChatApplication,
    chat_id: UUID,
    after_seq: int = 0,
    until_seq: int | None = None,
    limit: int | None = None,
    *,
    stored: bool = False,
) -> list[EventRecord]:
    """The chat's events after ``after_seq`` up to ``until_seq`` (at most ``limit``), oldest
    first, each with its link of the audit chain (and with ``stored``, the bytes it covers).
    Raises ``ChatNotFoundError`` if the chat has no events at all."""
    events = app.recorder.select_events(chat_id, gt=after_seq or None, lte=until_seq,
                                        limit=limit)
    if not events:
        if after_seq == 0:
            raise ChatNotFoundError(f"no chat {chat_id}")
        return []
    with reading(app) as curs:  # after the events: their links committed with them
        hashes = chain_table(app).hashes(curs, chat_id, after_seq,
                                         events[-1].originator_version)
    records = []
    for item in events:
        event = cast(ChatSession.Event, app.mapper.to_domain_event(item))
        record = event_record(event, hashes.get(item.originator_version))
        if stored:
            record["stored"] = {"topic": item.topic,
                                "state": base64.b64encode(item.state).decode("ascii")}
        records.append(record)
    return records


def chat_events(
    app: ChatApplication, chat_id: UUID, until_seq: int | None = None
) -> list[ChatSession.Event]:
    """The chat's events up to ``until_seq`` (every one if None), oldest first, as domain
    events. Raises ``ChatNotFoundError`` if the chat has no events at all."""
    events = app.recorder.select_events(chat_id, lte=until_seq)
    if not events and not app.recorder.select_events(chat_id, limit=1):
        raise ChatNotFoundError(f"no chat {chat_id}")
    return [cast(ChatSession.Event, app.mapper.to_domain_event(item)) for item in events]


def chat_at(app: ChatApplication, chat_id: UUID, seq: int | None = None) -> ChatSession:
    """The chat exactly as it was after event ``seq`` (the latest state if None)."""
    chat: object = app.repository.get(chat_id, version=seq)
    assert isinstance(chat, ChatSession)
    return chat


def all_chat_ids(app: ChatApplication, page: int = 1000) -> Iterator[UUID]:
    """Every chat id, in the order the chats were started."""
    topic = f"{ChatSession.Started.__module__}:{ChatSession.Started.__qualname__}"
    start = 1
    while True:
        batch = app.recorder.select_notifications(start, page, topics=[topic])
        for notification in batch:
            yield UUID(str(notification.originator_id))
        if len(batch) < page:
            return
        start = batch[-1].id + 1


def describe(record: EventRecord) -> str:
    """A one-line human reading of a record, for ``eventchat replay``."""
    data = record["data"]
    kind = record["type"]
    detail = ""
    if kind == "MessageReceived":
        detail = f"user: {data['text']!r}"
    elif kind == "TokensGenerated":
        detail = f"+{data['tokens']} tokens @{data['offset']}: {data['text']!r}"
    elif kind == "ToolInvoked":
        detail = f"{data['tool']}({data['arguments']}) [{data['call_id']}]"
    elif kind == "ToolCompleted":
        detail = f"-> {data['result']!r} in {data['duration_ms']} ms [{data['call_id']}]"
    elif kind == "ToolFailed":
        detail = f"!! {data['error']} [{data['call_id']}]"
    elif kind == "ResponseStarted":
        detail = f"{data['model']} via {data['provider']}, answering seq {data['reply_to_seq']}"
    elif kind in ("ResponseCompleted", "ResponseFailed", "ResponseStopped"):
        detail = f"usage={data.get('usage')} timing={data.get('timing')}"
        if "error" in data:
            detail = f"error={data['error']} " + detail
    elif kind == "ResponseInterrupted":
        detail = f"reason={data['reason']}"
    elif kind in ("Started", "Renamed"):
        detail = f"title={data['title']!r}" + (f" owner={data['owner']}" if "owner" in data else "")
    return f"{record['seq']:>6}  {record['timestamp']}  {kind:<20} {detail}"


def _plain(value: object) -> JSONValue:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
