"""Replays of a chat: the frames its followers got, sent again with the original pacing.

A replay reads the chat's events from the log and runs them through a fresh ``ChatFeed``,
the code that makes the live frames, from the chat's first event: so a replayed frame is the
frame a follower got (less what only the moment knew: the ``active_chats`` and
``queue_depth`` of ``backend_status`` are the server's at the replay). Where the live feed
reads the views, the replay's reads them as they were at that event (``ReplayFeed``). Events up to
``from_seq`` only bring the feed up to date. The frames are timed by ``app.events.pacing``:
a text batch is cut back into the chunks the model streamed, at their recorded times; every
other frame goes at its event's time. Nothing calls a model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from uuid import UUID

import trio
from pydantic import BaseModel, Field, model_validator

from ..events.domain import ChatSession
from ..events.pacing import Beat, beats
from ..events.replay import chat_events
from ..projections.rows import MessageDict
from ..projections.timetravel import RowsSoFar
from .errors import BadRequestError
from .feed import ChatFeed, Frame
from .schemas import MAX_SEQ
from .services import Services

#: Fastest replay, in times the original pace (0, as fast as possible, is faster still).
MAX_SPEED = 1000.0
#: Events a replay's feed goes through before it lets other tasks run.
YIELD_EVERY = 200


class Replay(BaseModel):
    """The ``replay`` frame: the events in (``from_seq``, ``to_seq``] at ``speed``."""

    chat_id: UUID
    from_seq: int = Field(0, ge=0, le=MAX_SEQ)
    to_seq: int | None = Field(None, ge=1, le=MAX_SEQ)
    speed: float = Field(1.0, ge=0, le=MAX_SPEED, allow_inf_nan=False)

    @model_validator(mode="after")
    def _range(self) -> Replay:
        if self.to_seq is not None and self.to_seq <= self.from_seq:
            raise ValueError("to_seq must be greater than from_seq")
        return self


@dataclass(frozen=True, slots=True)
class Cue:
    """A frame of a replay and when it goes, in seconds after the first (at speed 1)."""

    at_s: float
    frame: Frame


class ReplayFeed(ChatFeed):
    """A ``ChatFeed`` over the log: where the live feed reads the views (a turn's messages
    after an edit, the history of a branch switch), it reads them as they were right after
    the event it replays (the views' own handlers over the events so far)."""

    def __init__(self, svc: Services, owner: str, chat_id: UUID) -> None:
        super().__init__(svc, owner, chat_id)
        self.so_far = RowsSoFar()

    async def page(self, limit: int, after_seq: int | None = None
                   ) -> tuple[list[MessageDict], bool]:
        return self.so_far.page(self.cid, limit, after_seq)

    async def replayed(self, event: ChatSession.Event) -> list[Frame]:
        """The frames followers got for ``event``."""
        self.so_far.apply(event)
        async with aclosing(self.frames(event)) as frames:
            return [frame async for frame in frames]


async def replay_cues(svc: Services, owner: str, request: Replay) -> tuple[list[Cue], int]:
    """The frames of the replay ``request`` asks for, and the last seq it covers.

    Raises ``ChatNotFoundError`` (not the owner's, or no such chat) and ``BadRequestError``
    (``invalid_seq_range``) when ``from_seq`` is not below the chat's last seq.
    """
    await svc.require_chat(owner, request.chat_id)
    events = await svc.store.read(chat_events, svc.store.app, request.chat_id, request.to_seq)
    last = events[-1].originator_version if events else 0
    if request.from_seq >= last:
        raise BadRequestError(f"from_seq must be below the chat's last seq ({last})",
                              "invalid_seq_range")
    feed = ReplayFeed(svc, owner, request.chat_id)
    for event in events:
        if event.originator_version > request.from_seq:
            break
        await feed.replayed(event)  # the feed's state as it was at from_seq
        await _yield_now_and_then(event)
    cues: list[Cue] = []
    for beat in beats(events, request.from_seq):
        cues.extend(_cued(beat, await feed.replayed(beat.event)))
        await _yield_now_and_then(beat.event)
    return cues, last


async def _yield_now_and_then(event: ChatSession.Event) -> None:
    """Lets the other tasks run every ``YIELD_EVERY`` events (a long chat's feed runs in
    the event loop and awaits nothing of its own)."""
    if event.originator_version % YIELD_EVERY == 0:
        await trio.lowlevel.checkpoint()


async def play(cues: Sequence[Cue], speed: float,
               send: Callable[[Frame], Awaitable[None]]) -> None:
    """Sends each cue's frame, marked ``replay``, at its time divided by ``speed`` (0: at
    once, as fast as ``send`` takes them). Cancellation stops it between frames."""
    start = trio.current_time()
    for cue in cues:
        if speed > 0:
            await trio.sleep_until(start + cue.at_s / speed)
        else:
            await trio.lowlevel.checkpoint()
        await send({**cue.frame, "replay": True})


def done_frame(chat_id: UUID, last_seq: int) -> Frame:
    return {"event": "replay_done", "chat_id": str(chat_id), "last_seq": last_seq,
            "replay": True}


def _cued(beat: Beat, frames: list[Frame]) -> list[Cue]:
    """The frames of one event at its time; a text delta cut back into its chunks."""
    cues: list[Cue] = []
    for frame in frames:
        delta = frame.get("delta")
        if isinstance(delta, str) and len(beat.pieces) > 1 and frame["offset"] == (
                beat.pieces[0].offset) and delta == "".join(p.text for p in beat.pieces):
            cues.extend(Cue(p.at_s, {**frame, "delta": p.text, "offset": p.offset})
                        for p in beat.pieces)
        else:
            cues.append(Cue(beat.at_s, frame))
    return cues
