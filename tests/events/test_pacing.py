"""The clock of a replay: chunks at their recorded times, other events at theirs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from app.events.domain import ChatSession
from app.events.pacing import beats

CHAT = uuid4()
T0 = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)


def event(cls: Any, seq: int, at_s: float, **data: Any) -> ChatSession.Event:
    made: ChatSession.Event = cls(originator_id=CHAT, originator_version=seq,
                                  timestamp=T0 + timedelta(seconds=at_s), **data)
    return made


def reply(chunks: list[list[int]] | None) -> list[ChatSession.Event]:
    """A message at 0 s, a reply started at 1 s whose batches commit at 1.5 s and 3 s."""
    rid = "r1"
    return [
        event(ChatSession.MessageReceived, 2, 0.0, text="hi", client_message_id=None),
        event(ChatSession.ResponseStarted, 3, 1.0, response_id=rid, reply_to_seq=2,
              model="m", provider="p"),
        event(ChatSession.TokensGenerated, 4, 1.5, response_id=rid, text="Hello", offset=0,
              tokens=2, chunks=None if chunks is None else chunks[:2]),
        event(ChatSession.TokensGenerated, 5, 3.0, response_id=rid, text=" world", offset=5,
              tokens=1, chunks=None if chunks is None else chunks[2:]),
        event(ChatSession.ResponseStopped, 6, 3.1, response_id=rid, usage={}, timing={}),
    ]


def test_text_comes_in_its_chunks_at_their_times_and_the_rest_at_event_times() -> None:
    timeline = list(beats(reply([[3, 200], [2, 400], [6, 1900]])))
    assert [b.at_s for b in timeline] == [0.0, 1.0, 1.2, 2.9, 3.1]
    pieces = [(p.at_s, p.offset, p.text) for b in timeline for p in b.pieces]
    assert pieces == [(1.2, 0, "Hel"), (1.4, 3, "lo"), (2.9, 5, " world")]


def test_batches_without_chunks_go_whole_at_their_own_time() -> None:
    timeline = list(beats(reply(None)))
    pieces = [(p.at_s, p.offset, p.text) for b in timeline for p in b.pieces]
    assert pieces == [(1.5, 0, "Hello"), (3.0, 5, " world")]


def test_from_the_middle_of_a_reply_its_clock_still_counts_from_its_start() -> None:
    timeline = list(beats(reply([[3, 200], [2, 400], [6, 1900]]), after_seq=4))
    assert [b.event.originator_version for b in timeline] == [5, 6]
    # the reply began 2 s before the replay's first event (3 s): its chunk 1.9 s in would
    # come 0.1 s before the start, so it comes at the start; the ending 0.1 s after it
    assert [(p.at_s, p.text) for p in timeline[0].pieces] == [(0.0, " world")]
    assert round(timeline[1].at_s, 6) == 0.1


def test_time_never_goes_back() -> None:
    # chunk times that a clock step made later than the ending's timestamp
    timeline = list(beats(reply([[3, 200], [2, 400], [6, 2500]])))
    times = [t for b in timeline for t in (b.at_s, *(p.at_s for p in b.pieces))]
    assert times == sorted(times)
