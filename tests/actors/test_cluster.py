"""Two actor systems on one PostgreSQL, as two server processes would run."""

from __future__ import annotations

import json

import pytest
import trio

from app.actors import TokenDelta
from app.events.domain import ChatSession

from .conftest import ScriptedProvider, stop_system, stored_events, wait_until
from .test_system import until_answered


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_follower_process_receives_every_frame(start_system) -> None:
    owner_model = ScriptedProvider().then(*[f"w{i} " for i in range(40)], delay=0.01)
    a = await start_system(owner_model, token_flush_ms=30.0)
    b = await start_system(ScriptedProvider())
    chat_id = await a.create_chat("alice")
    await a.send_message(chat_id, "alice", "hello")  # a takes the chat and answers
    await trio.sleep(0.15)
    async with b.subscribe(chat_id, "alice") as far:
        assert far.state.response is not None  # joined in mid-answer
        text, seqs = far.state.response.text, []
        assert text.startswith("w0 w1 ")
        with trio.fail_after(10):
            async for item in far:
                if isinstance(item, TokenDelta):
                    assert item.offset == len(text)
                    text += item.text
                elif item.originator_version > far.state.last_seq:
                    seqs.append(item.originator_version)
                    if isinstance(item, ChatSession.ResponseCompleted):
                        break
    assert text == "".join(f"w{i} " for i in range(40))
    assert seqs == sorted(seqs)
    assert a.counts()["generating"] == 0 and b.counts()["generating"] == 0
    assert len(owner_model.requests) == 1


async def test_a_message_sent_through_another_process_is_answered_by_the_owner(
    start_system,
) -> None:
    owner_model = ScriptedProvider().then("first").then("second")
    other_model = ScriptedProvider()
    a = await start_system(owner_model)
    b = await start_system(other_model)
    chat_id = await a.create_chat("alice")
    await a.send_message(chat_id, "alice", "one")
    await until_answered(a, chat_id)
    accepted = await b.send_message(chat_id, "alice", "two", "from-b")
    assert accepted.seq > 2 and not accepted.duplicate
    await until_answered(a, chat_id, 2)
    assert other_model.requests == []  # only the owner runs the model
    assert owner_model.requests[1].messages[-1] == {"role": "user", "content": "two"}
    again = await a.send_message(chat_id, "alice", "two", "from-b")
    assert again.duplicate and again.seq == accepted.seq


async def test_stop_from_another_process_stops_the_response(start_system) -> None:
    owner_model = ScriptedProvider().then(*["slow "] * 300, delay=0.01)
    a = await start_system(owner_model)
    b = await start_system(ScriptedProvider())
    chat_id = await a.create_chat("alice")
    await a.send_message(chat_id, "alice", "go")
    await owner_model.started.wait()
    await trio.sleep(0.1)
    assert await b.stop_generation(chat_id, "alice") is True
    types = await until_answered(a, chat_id)
    assert types[-1] == "ResponseStopped"
    assert owner_model.closed == 1


async def test_a_surviving_process_takes_over_a_dead_owners_chat(start_system) -> None:
    a = await start_system(ScriptedProvider().then(*["tok "] * 500, delay=0.01))
    survivor_model = ScriptedProvider().then("taken over")
    b = await start_system(survivor_model)
    chat_id = await a.create_chat("alice")
    await a.send_message(chat_id, "alice", "long")
    await b.send_message(chat_id, "alice", "queued")  # b follows the chat
    await trio.sleep(0.2)
    await stop_system(a)  # its connections close: the lease is free
    types = await until_answered(b, chat_id, 2)
    events = await stored_events(b, chat_id)
    interrupted = next(e for e in events if isinstance(e, ChatSession.ResponseInterrupted))
    assert interrupted.reason == "owner_lost"
    assert types[-1] == "ResponseCompleted" and types.count("MessageReceived") == 2
    assert survivor_model.requests[0].messages[-1] == {"role": "user", "content": "queued"}
    await wait_until(lambda: b.counts()["generating"] == 0)


def test_bus_merges_contiguous_deltas_and_cuts_long_ones_to_fit() -> None:
    from app.actors.cluster import MAX_PAYLOAD, Bus, _encoded
    from app.config import Settings

    bus = Bus(Settings(database_url="postgresql://x@127.0.0.1/db"), lambda item: None)
    text = "".join(f"tok{i} " for i in range(2000))
    offset = 0
    for piece in text.split(" ")[:-1]:
        bus.send(k="d", c="chat", r="resp", t=piece + " ", o=offset)
        offset += len(piece) + 1
    bus.send(k="e", c="chat", a=3, b=4)
    bus.send(k="d", c="chat", r="resp", t="after", o=offset)
    assert [item["k"] for item in bus._outbox] == ["d", "e", "d"]  # one delta per burst
    lines = _encoded(bus._outbox)
    pieces = [json.loads(line) for line in lines if '"k":"d"' in line][:-1]
    assert "".join(p["t"] for p in pieces) == text
    assert [p["o"] for p in pieces] == [
        sum(len(q["t"]) for q in pieces[:i]) for i in range(len(pieces))
    ]
    assert all(len(payload) <= MAX_PAYLOAD + 13 for payload in bus._payloads(lines))


def test_bus_cuts_a_delta_of_astral_characters_to_fit_a_notify_payload() -> None:
    from app.actors.cluster import MAX_PAYLOAD, Bus, _encoded
    from app.config import Settings

    bus = Bus(Settings(database_url="postgresql://x@127.0.0.1/db"), lambda item: None)
    text = "😀" * 3000  # 12 bytes each once JSON-escaped
    bus.send(k="d", c="chat", r="resp", t=text, o=7)
    lines = _encoded(bus._outbox)
    pieces = [json.loads(line) for line in lines]
    assert "".join(p["t"] for p in pieces) == text
    assert [p["o"] for p in pieces] == [7 + sum(len(q["t"]) for q in pieces[:i])
                                        for i in range(len(pieces))]  # code points
    payloads = bus._payloads(lines)
    assert all(len(payload.encode()) <= 8000 for payload in payloads)  # NOTIFY's limit
    assert all(len(payload) <= MAX_PAYLOAD + 13 for payload in payloads)
