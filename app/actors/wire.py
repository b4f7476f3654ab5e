"""What server processes tell each other over the bus: one dataclass per kind of message,
and their one codec.

On the wire (``NOTIFY`` payloads, one JSON object a line) a message stays compact: its kind
is one letter under ``k`` and its fields have one-letter keys. ``encode`` and ``decode`` are
the only code that knows those letters; everything else speaks in the dataclasses.

==========  ====  ==============================================================
message     kind  fields on the wire
==========  ====  ==============================================================
Saved       e     c chat, a first seq, b last seq (events saved by the sender)
Delta       d     c chat, r response, o offset, t text (streamed, not yet saved)
Ended       z     c chat, r response (a response running there has ended)
StopAsked   x     c chat (stop the chat's running response, if it runs here)
CatchUp     r     (items were lost: catch up from the log)
==========  ====  ==============================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from uuid import UUID

#: A message in its wire form (before JSON).
WireItem = dict[str, str | int]


@dataclass(frozen=True, slots=True)
class Saved:
    """The sender saved events ``first``..``last`` of the chat."""

    chat_id: UUID
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Delta:
    """Text streamed by a response running in the sender, at ``offset`` of its reply."""

    chat_id: UUID
    response_id: str
    offset: int
    text: str


@dataclass(frozen=True, slots=True)
class Ended:
    """A response running in the sender has ended (its ending is saved)."""

    chat_id: UUID
    response_id: str


@dataclass(frozen=True, slots=True)
class StopAsked:
    """A client asked to stop the chat's running response (wherever it runs)."""

    chat_id: UUID


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Messages were lost (a connection was made again): catch up from the log."""


BusMessage = Saved | Delta | Ended | StopAsked | CatchUp


def encode(message: BusMessage) -> WireItem:
    """The compact wire form of ``message``."""
    match message:
        case Saved(chat_id, first, last):
            return {"k": "e", "c": str(chat_id), "a": first, "b": last}
        case Delta(chat_id, response_id, offset, text):
            return {"k": "d", "c": str(chat_id), "r": response_id, "t": text, "o": offset}
        case Ended(chat_id, response_id):
            return {"k": "z", "c": str(chat_id), "r": response_id}
        case StopAsked(chat_id):
            return {"k": "x", "c": str(chat_id)}
        case CatchUp():
            return {"k": "r"}


def decode(item: Mapping[str, object]) -> BusMessage:
    """The message of a wire item; raises ``ValueError`` for one that is not a message."""
    try:
        kind = item["k"]
        if kind == "r":
            return CatchUp()
        chat_id = UUID(str(item["c"]))
        if kind == "e":
            return Saved(chat_id, _int(item["a"]), _int(item["b"]))
        if kind == "d":
            return Delta(chat_id, str(item["r"]), _int(item["o"]), str(item["t"]))
        if kind == "z":
            return Ended(chat_id, str(item["r"]))
        if kind == "x":
            return StopAsked(chat_id)
    except KeyError as exc:
        raise ValueError(f"bus item without {exc}") from None
    raise ValueError(f"unknown bus item kind {kind!r}")


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"not an integer: {value!r}")
    return value
