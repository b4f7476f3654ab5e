"""``WriteAhead`` on its own: the phases of a reply's text between the model and the log."""

from __future__ import annotations

import math

import pytest

from app.actors.writeahead import Group, Phase, WriteAhead

INTERVAL = 0.06


def test_the_first_text_is_taken_at_once_and_later_text_once_per_interval() -> None:
    stream = WriteAhead(INTERVAL)
    assert stream.phase is Phase.READY and stream.due() is None
    stream.add("Hel", 1, at_ms=12)
    assert stream.phase is Phase.WAITING and stream.due() == -math.inf + INTERVAL
    first = stream.take(now=10.0)
    assert first == Group(0, "Hel", 1, ((3, 12),))
    assert stream.phase is Phase.COMMITTING
    stream.add("lo", 1, at_ms=14)
    stream.add(" wo", 1, at_ms=20)
    assert stream.due() is None  # one commit at a time
    stream.committed_group(first)
    assert stream.committed == 3 and stream.phase is Phase.WAITING
    assert stream.due() == pytest.approx(10.0 + INTERVAL)
    assert stream.take(now=10.03) is None  # its slot has not come
    second = stream.take(now=10.06)
    assert second == Group(3, "lo wo", 2, ((2, 14), (3, 20)))
    stream.committed_group(second)
    assert stream.committed == 8 and stream.phase is Phase.READY


def test_text_after_a_quiet_interval_is_taken_at_once() -> None:
    stream = WriteAhead(INTERVAL)
    stream.add("a", 1, at_ms=0)
    stream.committed_group(stream.take(now=1.0) or pytest.fail("nothing taken"))
    stream.add("b", 1, at_ms=500)
    assert stream.due() == pytest.approx(1.0 + INTERVAL)  # long past at 1.5: at once
    assert stream.take(now=1.5) == Group(1, "b", 1, ((1, 500),))


def test_rest_takes_everything_waiting_regardless_of_the_slot() -> None:
    stream = WriteAhead(INTERVAL, offset=7)
    stream.add("x", 1, at_ms=1)
    stream.committed_group(stream.take(now=2.0) or pytest.fail("nothing taken"))
    stream.add("yz", 2, at_ms=2)
    assert stream.take(now=2.001) is None
    assert stream.take(now=2.001, rest=True) == Group(8, "yz", 2, ((2, 2),))


def test_held_text_waits_for_the_start_and_is_dropped_if_it_was_not_saved() -> None:
    stream = WriteAhead(INTERVAL, held=True)
    stream.add("early", 1, at_ms=3)
    assert stream.phase is Phase.HELD and stream.due() is None
    assert stream.take(now=1.0, rest=True) is None
    stream.settle(saved=True)
    assert stream.phase is Phase.WAITING
    assert stream.take(now=1.0) == Group(0, "early", 1, ((5, 3),))

    lost = WriteAhead(INTERVAL, held=True)
    lost.add("never shown", 2, at_ms=3)
    lost.settle(saved=False)
    assert lost.phase is Phase.CLOSED and lost.waiting == 0
    lost.add("more", 1, at_ms=4)
    assert lost.take(now=1.0, rest=True) is None


def test_a_closed_stream_takes_nothing_and_forgets_its_group_in_flight() -> None:
    stream = WriteAhead(INTERVAL)
    stream.add("a", 1, at_ms=0)
    assert stream.take(now=0.0) is not None
    stream.close()
    assert stream.phase is Phase.CLOSED and stream.due() is None
    stream.add("b", 1, at_ms=1)
    assert stream.waiting == 0 and stream.take(now=9.0, rest=True) is None


def test_chunk_sizes_count_code_points() -> None:
    stream = WriteAhead(INTERVAL)
    stream.add("😀é", 1, at_ms=0)  # two code points (three UTF-16 units)
    group = stream.take(now=0.0)
    assert group is not None and group.chunks == ((2, 0),)
    stream.committed_group(group)
    assert stream.committed == 2
