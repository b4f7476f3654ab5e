"""The bus codec: every message survives its compact wire form, which stays as it was."""

from __future__ import annotations

import json
from uuid import uuid4

import pytest

from app.actors.wire import CatchUp, Delta, Ended, Saved, StopAsked, decode, encode


def test_every_message_survives_the_wire() -> None:
    chat_id = uuid4()
    messages = [Saved(chat_id, 3, 5), Delta(chat_id, "r1", 7, "text"), Ended(chat_id, "r1"),
                StopAsked(chat_id), CatchUp()]
    for message in messages:
        assert decode(json.loads(json.dumps(encode(message)))) == message


def test_the_wire_form_is_compact() -> None:
    chat_id = uuid4()
    assert encode(Delta(chat_id, "r1", 7, "hi")) == {
        "k": "d", "c": str(chat_id), "r": "r1", "t": "hi", "o": 7
    }
    assert encode(Saved(chat_id, 1, 2)) == {"k": "e", "c": str(chat_id), "a": 1, "b": 2}
    assert encode(CatchUp()) == {"k": "r"}


@pytest.mark.parametrize("item", [{}, {"k": "q", "c": str(uuid4())}, {"k": "e", "c": "x"},
                                  {"k": "e", "c": str(uuid4()), "a": "1", "b": 2}])
def test_what_is_not_a_message_is_refused(item: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        decode(item)
