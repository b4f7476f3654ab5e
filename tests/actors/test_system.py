"""Real actors on real stores, driven through whole turns."""

from __future__ import annotations

import json
from contextlib import aclosing
from uuid import uuid4

import pytest
import trio
from eventsourcing.persistence import PersistenceError

from app.actors import ActorSystem, SubscriberDroppedError, TokenDelta
from app.events.domain import ChatSession
from app.events.errors import (
    ChatNotFoundError,
    EmptyMessageError,
    MessageTooLongError,
    StoreUnavailableError,
)

from .conftest import ScriptedProvider, event_types, stop_system, stored_events, wait_until

ENDINGS = {"ResponseCompleted", "ResponseFailed", "ResponseStopped", "ResponseInterrupted"}


async def until_answered(system: ActorSystem, chat_id: object, answers: int = 1) -> list[str]:
    async def ended() -> int:
        return sum(t in ENDINGS for t in await event_types(system, chat_id))

    with trio.fail_after(10):
        while await ended() < answers:  # noqa: ASYNC110 - polling the store
            await trio.sleep(0.01)
    return await event_types(system, chat_id)


async def test_plain_turn_records_and_streams(start_system, provider: ScriptedProvider) -> None:
    system = await start_system(provider.then("Hel", "lo", " there"))
    chat_id = await system.create_chat("alice", "greetings")
    saves: list[int] = []
    system.store.on_saved.append(saves.append)
    async with system.subscribe(chat_id, "alice") as sub:
        accepted = await system.send_message(chat_id, "alice", "hi", "c-1")
        assert (accepted.seq, accepted.duplicate) == (2, False)
        deltas: list[TokenDelta] = []
        with trio.fail_after(5):
            async for item in sub:
                if isinstance(item, TokenDelta):
                    deltas.append(item)
                if isinstance(item, ChatSession.ResponseCompleted):
                    break
    types = await event_types(system, chat_id)
    assert types[:3] == ["Started", "MessageReceived", "ResponseStarted"]
    # an idle chat records the message and starts its response in one transaction
    assert saves[0] == 3
    assert types[-1] == "ResponseCompleted"
    assert set(types[3:-1]) == {"TokensGenerated"}
    assert "".join(d.text for d in deltas) == "Hello there"
    assert [d.offset for d in deltas] == [
        sum(len(x.text) for x in deltas[:i]) for i in range(len(deltas))
    ]
    events = await stored_events(system, chat_id)
    ending = events[-1]
    assert ending.usage["completion_tokens"] == 3 and ending.usage["total_tokens"] == 13
    assert ending.finish_reason == "stop" and ending.model == "scripted-1"
    assert (
        ending.timing["ttft_ms"] >= 0 and ending.timing["duration_ms"] >= ending.timing["ttft_ms"]
    )
    chat = await system.store.get(chat_id)
    assert chat.history[-1]["content"] == "Hello there"
    assert provider.requests[0].messages[-1] == {"role": "user", "content": "hi"}


async def test_tool_calls_are_recorded_and_given_back(start_system, provider) -> None:
    provider.then(
        tool_calls=[
            ("call-1", "calculator", '{"expression": "12*7"}'),
            ("call-2", "calculator", '{"expression": "9**9**9"}'),
        ]
    )
    provider.then("12*7 is ", "84.")
    system = await start_system(provider)
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "what is 12*7")
    types = await until_answered(system, chat_id)
    assert types[3:7] == ["ToolInvoked", "ToolCompleted", "ToolInvoked", "ToolFailed"]
    events = await stored_events(system, chat_id)
    invoked, completed, _, failed = events[3:7]
    assert invoked.arguments == {"expression": "12*7"} and invoked.tool == "calculator"
    assert completed.result == 84 and completed.duration_ms >= 0
    assert "9**9**9" in json.dumps(events[5].arguments) and failed.error
    second = provider.requests[1].messages
    assert second[-3]["tool_calls"][0]["function"]["name"] == "calculator"
    assert second[-2] == {"role": "tool", "tool_call_id": "call-1", "content": "84"}
    assert second[-1]["tool_call_id"] == "call-2" and "error" in json.loads(second[-1]["content"])
    assert types[-1] == "ResponseCompleted"
    chat = await system.store.get(chat_id)
    assert chat.history[-1]["content"] == "12*7 is 84."


async def test_tool_rounds_are_bounded(start_system, provider) -> None:
    loop = [("c", "current_time", "{}")]
    for _ in range(10):
        provider.then(tool_calls=loop)
    system = await start_system(provider, max_tool_rounds=2)
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "time?")
    types = await until_answered(system, chat_id)
    assert types.count("ToolInvoked") == 2
    assert provider.requests[-1].tools == ()  # the last round offers no tools
    assert len(provider.requests) == 3


async def test_stop_ends_response_and_closes_the_model_call(start_system, provider) -> None:
    system = await start_system(provider.then(*["tok "] * 200, delay=0.02))
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "tell me a long story")
    await provider.started.wait()
    await trio.sleep(0.15)
    assert await system.stop_generation(chat_id, "alice") is True
    types = await until_answered(system, chat_id)
    assert types[-1] == "ResponseStopped"
    assert provider.closed == 1
    ending = (await stored_events(system, chat_id))[-1]
    assert ending.usage["estimated"] is True and ending.usage["completion_tokens"] >= 2
    assert ending.usage["prompt_tokens"] >= 1
    chat = await system.store.get(chat_id)
    kept = chat.history[-1]["content"]
    assert kept.startswith("tok tok") and len(kept) < 200 * 4
    assert await system.stop_generation(chat_id, "alice") is False


async def test_model_failure_keeps_partial_text(start_system, provider) -> None:
    system = await start_system(provider.then("par", "tial", "never", fail_after=2))
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "hi")
    types = await until_answered(system, chat_id)
    assert types[-1] == "ResponseFailed"
    events = await stored_events(system, chat_id)
    assert events[-1].error["code"] == "model_stream_broken"
    assert events[-1].usage["completion_tokens"] == 2 and events[-1].usage["estimated"]
    chat = await system.store.get(chat_id)
    assert chat.history[-1]["content"] == "partial"
    # the chat goes on after a failure
    await system.send_message(chat_id, "alice", "again")
    assert (await until_answered(system, chat_id, 2))[-1] == "ResponseCompleted"


async def test_queued_messages_are_answered_one_at_a_time_in_order(start_system, provider) -> None:
    for word in ("one", "two", "three"):
        provider.then(word, delay=0.02)
    system = await start_system(provider)
    chat_id = await system.create_chat("alice")
    seqs = [(await system.send_message(chat_id, "alice", f"m{i}")).seq for i in range(3)]
    assert seqs == sorted(seqs)
    await until_answered(system, chat_id, 3)
    events = await stored_events(system, chat_id)
    starts = [e for e in events if isinstance(e, ChatSession.ResponseStarted)]
    assert [s.reply_to_seq for s in starts] == seqs
    # no response starts before the previous one ended
    open_responses = 0
    for e in events:
        open_responses += isinstance(e, ChatSession.ResponseStarted)
        open_responses -= isinstance(e, ChatSession.ENDINGS)
        assert open_responses <= 1
    answers = [
        m["content"] for m in (await system.store.get(chat_id)).history if m["role"] == "assistant"
    ]
    assert answers == ["one", "two", "three"]
    # each answer sees the conversation up to its own question, not the queued ones
    assert [r.messages[-1]["content"] for r in provider.requests] == ["m0", "m1", "m2"]
    assert [m["content"] for m in provider.requests[2].messages] == ["m0", "one", "m1", "two", "m2"]


async def test_repeated_client_message_id_creates_nothing(start_system, provider) -> None:
    system = await start_system(provider.then("answer"))
    chat_id = await system.create_chat("alice")
    first = await system.send_message(chat_id, "alice", "hi", "same-id")
    await until_answered(system, chat_id)
    before = await event_types(system, chat_id)
    again = await system.send_message(chat_id, "alice", "hi", "same-id")
    assert again.duplicate and again.seq == first.seq
    assert again.outcome is not None and again.outcome.status == "complete"
    assert again.outcome.text == "answer" and again.response_id == again.outcome.response_id
    await trio.sleep(0.1)
    assert await event_types(system, chat_id) == before
    assert len(provider.requests) == 1


async def test_bad_input_is_refused_and_changes_nothing(start_system, provider) -> None:
    system = await start_system(provider, max_message_chars=10)
    chat_id = await system.create_chat("alice")
    with pytest.raises(EmptyMessageError):
        await system.send_message(chat_id, "alice", "   ")
    with pytest.raises(MessageTooLongError):
        await system.send_message(chat_id, "alice", "x" * 11)
    with pytest.raises(ChatNotFoundError):
        await system.send_message(uuid4(), "alice", "hello")
    with pytest.raises(ChatNotFoundError):
        await system.send_message(chat_id, "mallory", "hello")
    with pytest.raises(ChatNotFoundError):
        async with system.subscribe(chat_id, "mallory"):
            pass
    assert await event_types(system, chat_id) == ["Started"]
    assert provider.requests == []


async def model_called(provider: ScriptedProvider) -> None:
    with trio.fail_after(5):
        await provider.started.wait()


async def test_the_model_is_called_while_the_message_commits(start_system, provider) -> None:
    """The model call starts as soon as the message is checked; what it streams is held
    until the message and its response's start are durable, so nothing is seen early."""
    system = await start_system(provider.then("Hel", "lo"))
    chat_id = await system.create_chat("alice")
    save, committed = system.store.app.save, trio.Event()
    token = trio.lowlevel.current_trio_token()

    def slow_save(*objs: object, **kwargs: object) -> object:
        # the model call starts while this commit waits
        trio.from_thread.run(model_called, provider, trio_token=token)
        result = save(*objs, **kwargs)
        trio.from_thread.run_sync(committed.set, trio_token=token)
        return result

    system.store.app.save = slow_save  # type: ignore[method-assign]
    seen: list[tuple[str, bool]] = []
    text = ""
    async with system.subscribe(chat_id, "alice") as sub:
        accepted = await system.send_message(chat_id, "alice", "hi")
        system.store.app.save = save  # type: ignore[method-assign]
        with trio.fail_after(5):
            async for item in sub:
                seen.append((type(item).__name__, committed.is_set()))
                if isinstance(item, TokenDelta):
                    assert item.offset == len(text)
                    text += item.text
                if isinstance(item, ChatSession.ResponseCompleted):
                    break
    assert accepted.seq == 2
    assert [name for name, _ in seen[:3]] == ["MessageReceived", "ResponseStarted", "TokenDelta"]
    assert all(durable for _, durable in seen)
    assert text == "Hello" and seen[-1][0] == "ResponseCompleted"
    assert (await stored_events(system, chat_id))[-1].finish_reason == "stop"


async def test_a_failed_commit_abandons_the_early_model_call(start_system, provider) -> None:
    """The message's transaction fails after its model call began: the sender gets the
    store error, the model call is closed, nothing is published or recorded, and the chat
    answers the next message as if the failed one had never been sent."""
    system = await start_system(provider.then("never", "seen").then("fine"))
    chat_id = await system.create_chat("alice")
    save = system.store.app.save
    token = trio.lowlevel.current_trio_token()

    def failing_save(*objs: object, **kwargs: object) -> object:
        trio.from_thread.run(model_called, provider, trio_token=token)
        raise PersistenceError("the disk is gone")

    system.store.app.save = failing_save  # type: ignore[method-assign]
    seen: list[str] = []
    async with system.subscribe(chat_id, "alice") as sub:
        with pytest.raises(StoreUnavailableError):
            await system.send_message(chat_id, "alice", "lost", "c-lost")
        system.store.app.save = save  # type: ignore[method-assign]
        await wait_until(lambda: provider.closed == 1)
        accepted = await system.send_message(chat_id, "alice", "hello", "c-lost")
        with trio.fail_after(5):
            async for item in sub:
                seen.append(type(item).__name__)
                if isinstance(item, ChatSession.ResponseCompleted):
                    break
    assert accepted.seq == 2 and not accepted.duplicate
    assert seen == ["MessageReceived", "ResponseStarted", "TokenDelta", "TokensGenerated",
                    "ResponseCompleted"]
    assert await event_types(system, chat_id) == [
        "Started", "MessageReceived", "ResponseStarted", "TokensGenerated", "ResponseCompleted"]
    assert [r.messages[-1]["content"] for r in provider.requests] == ["lost", "hello"]
    assert provider.requests[1].messages == [{"role": "user", "content": "hello"}]


async def test_passivated_chat_comes_back_with_its_state(start_system, provider) -> None:
    system = await start_system(provider.then("first answer").then("second"), passivate_after_s=0.1)
    chat_id = await system.create_chat("alice", system_prompt="be brief")
    await system.send_message(chat_id, "alice", "first", "c1")
    await until_answered(system, chat_id)
    await wait_until(lambda: system.counts()["active_chats"] == 0)
    again = await system.send_message(chat_id, "alice", "first", "c1")
    assert again.duplicate and again.seq == 2
    await system.send_message(chat_id, "alice", "second question")
    await until_answered(system, chat_id, 2)
    assert provider.requests[-1].messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]


class CrashingProvider(ScriptedProvider):
    """Raises a bug (not a model error) in the middle of its first stream."""

    def __init__(self) -> None:
        super().__init__()
        self.crashes = 1

    async def _items(self, script):  # type: ignore[no-untyped-def]
        async with aclosing(super()._items(script)) as items:
            async for item in items:
                yield item
                if self.crashes:
                    self.crashes -= 1
                    raise RuntimeError("bug in the middle of a stream")


async def test_crashed_actor_restarts_from_the_log(start_system) -> None:
    provider = CrashingProvider().then("a", "b", "c").then("fine")
    system = await start_system(provider)
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "first")
    types = await until_answered(system, chat_id)
    assert types[-1] == "ResponseInterrupted"
    events = await stored_events(system, chat_id)
    assert events[-1].reason == "actor_restarted"
    assert system.restarts == 1
    await system.send_message(chat_id, "alice", "second")
    assert (await until_answered(system, chat_id, 2))[-1] == "ResponseCompleted"


async def test_restart_interrupts_open_response_and_answers_waiting_messages(
    start_system, provider
) -> None:
    provider.then(*["word "] * 100, delay=0.02)
    system = await start_system(provider)
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "long one", "c1")
    await system.send_message(chat_id, "alice", "queued", "c2")
    await trio.sleep(0.3)
    await stop_system(system)  # dies with a response open and a message waiting

    after = ScriptedProvider().then("late answer")
    system2 = await start_system(after)
    types = await until_answered(system2, chat_id, 2)
    assert types.count("MessageReceived") == 2
    events = await stored_events(system2, chat_id)
    interrupted = next(e for e in events if isinstance(e, ChatSession.ResponseInterrupted))
    assert interrupted.reason == "server_restarted"
    chat = await system2.store.get(chat_id)
    assistant = [m["content"] for m in chat.history if m["role"] == "assistant"]
    assert assistant[0].startswith("word word") and assistant[1] == "late answer"
    assert after.requests[0].messages[-1] == {"role": "user", "content": "queued"}


async def test_tokens_are_persisted_in_batches(start_system, provider) -> None:
    tokens = [f"t{i} " for i in range(500)]
    system = await start_system(provider.then(*tokens))
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "go")
    types = await until_answered(system, chat_id)
    assert 1 <= types.count("TokensGenerated") <= 10
    events = await stored_events(system, chat_id)
    batches = [e for e in events if isinstance(e, ChatSession.TokensGenerated)]
    assert "".join(b.text for b in batches) == "".join(tokens)
    assert sum(b.tokens for b in batches) == 500
    assert [b.offset for b in batches] == [
        sum(len(x.text) for x in batches[:i]) for i in range(len(batches))
    ]


async def test_slow_stream_flushes_at_most_once_per_interval(start_system, provider) -> None:
    system = await start_system(provider.then(*["x"] * 60, delay=0.005), token_flush_ms=50.0)
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "go")
    await until_answered(system, chat_id)
    events = await stored_events(system, chat_id)
    batches = [e for e in events if isinstance(e, ChatSession.TokensGenerated)]
    duration_s = events[-1].timing["duration_ms"] / 1000
    assert len(batches) >= 2  # streamed text reaches the log while it streams
    assert len(batches) <= duration_s / 0.05 + 2


async def test_slow_subscriber_is_dropped_without_slowing_the_turn(start_system, provider) -> None:
    tokens = [f"{i} " for i in range(100)]
    system = await start_system(provider.then(*tokens, delay=0.003), subscriber_queue_size=6)
    chat_id = await system.create_chat("alice")
    async with (
        system.subscribe(chat_id, "alice") as slow,
        system.subscribe(chat_id, "alice") as fast,
    ):
        await system.send_message(chat_id, "alice", "go")
        text = ""
        with trio.fail_after(5):
            async for item in fast:
                if isinstance(item, TokenDelta):
                    assert item.offset == len(text)
                    text += item.text
                if isinstance(item, ChatSession.ResponseCompleted):
                    break
        assert text == "".join(tokens)
        with pytest.raises(SubscriberDroppedError, match="too slow"):
            while True:
                await slow.receive()


async def test_a_lagging_subscriber_gets_merged_deltas(start_system, provider) -> None:
    tokens = [f"t{i} " for i in range(2000)]  # far more than the queue holds
    system = await start_system(provider.then(*tokens), subscriber_queue_size=64)
    chat_id = await system.create_chat("alice")
    async with system.subscribe(chat_id, "alice") as sub:
        await system.send_message(chat_id, "alice", "go")
        await provider.started.wait()
        await trio.sleep(0.2)  # lag behind the whole stream
        text, deltas = "", 0
        with trio.fail_after(5):
            async for item in sub:
                if isinstance(item, TokenDelta):
                    assert item.offset == len(text)
                    text, deltas = text + item.text, deltas + 1
                if isinstance(item, ChatSession.ResponseCompleted):
                    break
    assert text == "".join(tokens)
    assert deltas < 100  # merged while waiting, not one per token


async def test_subscriber_joining_midway_gets_the_text_so_far(start_system, provider) -> None:
    system = await start_system(provider.then(*[f"{i}," for i in range(40)], delay=0.01))
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "count")
    await trio.sleep(0.15)
    async with system.subscribe(chat_id, "alice") as sub:
        assert sub.state.response is not None
        text = sub.state.response.text
        assert text and sub.state.last_seq >= 3
        with trio.fail_after(5):
            async for item in sub:
                if isinstance(item, TokenDelta):
                    assert item.offset == len(text)
                    text += item.text
                if isinstance(item, ChatSession.ResponseCompleted):
                    break
    assert text == "".join(f"{i}," for i in range(40))


async def test_snapshots_load_long_chats(start_system, provider) -> None:
    system = await start_system(provider, snapshot_interval=10, passivate_after_s=0.05)
    chat_id = await system.create_chat("alice")
    for i in range(8):
        provider.then(f"answer {i}")
        await system.send_message(chat_id, "alice", f"q{i}")
        await until_answered(system, chat_id, i + 1)
    app = system.store.app
    snapshots = await system.store.run(lambda: list(app.snapshots.get(chat_id)))
    assert snapshots and snapshots[-1].originator_version % 10 == 0
    await wait_until(lambda: system.counts()["active_chats"] == 0)
    chat = await system.store.get(chat_id)
    assert chat.message_count == 16 and chat.history[-1]["content"] == "answer 7"
