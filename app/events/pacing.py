"""When each part of a chat was shown, from its log: the clock of a replay.

A reply's text is stored in batches (``TokensGenerated``), and each batch keeps the chunks the
model streamed it in, with their arrival times (``chunks``: ``[code points, ms since the reply
began]``). ``beats`` turns a run of events into ``Beat``s: each event at its own timestamp,
a batch's text cut back into its chunks at their own times (a batch without chunks, as older
events are stored, at the batch's timestamp). Times are seconds since the first beat, and
never go back (a frame is never shown before the one it followed).

Pure and synchronous: the WebSocket replay (``app.web.player``) and
``eventchat replay --live`` both pace with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from .domain import ChatSession


@dataclass(frozen=True, slots=True)
class Piece:
    """A part of a batch's text: ``text`` at ``offset`` in the reply, shown at ``at_s``."""

    at_s: float
    offset: int
    text: str


@dataclass(frozen=True, slots=True)
class Beat:
    """One event of the replay at ``at_s``; a text batch also has its ``pieces`` (the
    first at ``at_s``)."""

    at_s: float
    event: ChatSession.Event
    pieces: tuple[Piece, ...] = ()


def beats(events: Iterable[ChatSession.Event], after_seq: int = 0) -> Iterator[Beat]:
    """The beats of the events after ``after_seq``; earlier events only set the clock of a
    reply that began before it (they yield nothing)."""
    began: dict[str, datetime] = {}
    start: datetime | None = None
    last = 0.0
    for event in events:
        if isinstance(event, ChatSession.ResponseStarted):
            began[event.response_id] = event.timestamp
        if event.originator_version <= after_seq:
            continue
        if start is None:
            start = event.timestamp
        pieces: tuple[Piece, ...] = ()
        if isinstance(event, ChatSession.TokensGenerated):
            pieces = tuple(_pieces(event, began.get(event.response_id), start))
        at = max(last, pieces[0].at_s if pieces else _since(event.timestamp, start))
        pieces = tuple(Piece(max(p.at_s, at), p.offset, p.text) for p in pieces)
        last = max(at, pieces[-1].at_s) if pieces else at
        yield Beat(at, event, pieces)


def _pieces(event: ChatSession.TokensGenerated, began: datetime | None,
            start: datetime) -> Iterator[Piece]:
    chunks = event.chunks or []
    if began is None or sum(size for size, _ in chunks) != len(event.text) or not chunks:
        yield Piece(_since(event.timestamp, start), event.offset, event.text)
        return
    # the reply may have begun before the replay's first event (a replay from its middle)
    cut, origin = 0, (began - start).total_seconds()
    previous = 0.0
    for size, at_ms in chunks:
        previous = max(previous, origin + at_ms / 1000)
        yield Piece(previous, event.offset + cut, event.text[cut:cut + size])
        cut += size


def _since(moment: datetime, start: datetime) -> float:
    return max(0.0, (moment - start).total_seconds())
