"""A ``Turn`` on its own: fake ports (an in-memory chat whose ``record`` applies mutations
and keeps their events), no store and no actor."""

from __future__ import annotations

from pathlib import Path

import trio

from app.actors.turn import Mutation, Turn, TurnPorts
from app.config import Settings
from app.events.domain import ChatSession
from app.events.errors import FencedError
from app.llm.tools import default_registry

from .conftest import ScriptedProvider


class FakeChat:
    """The ports of one chat held in memory: ``record`` applies mutations, nothing is saved."""

    def __init__(self, provider: ScriptedProvider, settings: Settings) -> None:
        self.chat = ChatSession.start("alice")
        self.chat.receive_message("What is 6 * 7?")
        self.response_id = self.chat.start_response("scripted-1", provider.name)
        self.chat.collect_events()
        self.recorded: list[object] = []
        self.fenced = False
        self.ports = TurnPorts(
            self.chat.id, lambda: self.chat, self.record, provider, default_registry(settings),
            settings,
        )

    async def record(self, *mutations: Mutation) -> object:
        if self.fenced:
            raise FencedError("not ours to write")
        results = [mutate(self.chat) for mutate in mutations]
        self.recorded.extend(self.chat.collect_events())
        return results[0]

    def turn(self) -> Turn:
        current = self.chat.current
        assert current is not None
        return Turn(self.ports, current.response_id, current.model, current.reply_to_seq)

    def kinds(self) -> list[str]:
        return [type(event).__name__ for event in self.recorded]

    def texts(self) -> list[tuple[str, int]]:
        return [(e.text, e.offset) for e in self.recorded
                if isinstance(e, ChatSession.TokensGenerated)]


def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, token_flush_ms=1, max_tool_rounds=2)


async def test_a_turn_records_its_text_and_its_ending(tmp_path: Path) -> None:
    provider = ScriptedProvider().then("Forty", "-two")
    fake = FakeChat(provider, settings(tmp_path))
    with trio.fail_after(5):
        await fake.turn().run(fake.chat.context(10))
    # the first text is committed at once, the rest in the next group
    assert fake.texts() == [("Forty", 0), ("-two", 5)]
    batches = [e for e in fake.recorded if isinstance(e, ChatSession.TokensGenerated)]
    # each batch keeps its chunks: code points and when they arrived
    assert [[size for size, _ in b.chunks or []] for b in batches] == [[5], [4]]
    times = [at for b in batches for _, at in b.chunks or []]
    assert times == sorted(times) and times[0] >= 0
    assert fake.kinds()[-1] == "ResponseCompleted"
    ended = fake.recorded[-1]
    assert isinstance(ended, ChatSession.ResponseCompleted)
    assert ended.usage["completion_tokens"] == 2 and ended.finish_reason == "stop"
    assert fake.chat.current is None and fake.chat.outcomes[fake.response_id].text == "Forty-two"


async def test_a_turn_runs_the_tools_the_model_asks_for(tmp_path: Path) -> None:
    provider = ScriptedProvider().then(
        tool_calls=[("call-1", "calculator", '{"expression": "6*7"}')]
    ).then("42")
    fake = FakeChat(provider, settings(tmp_path))
    with trio.fail_after(5):
        await fake.turn().run(fake.chat.context(10))
    assert fake.kinds() == ["ToolInvoked", "ToolCompleted", "TokensGenerated",
                            "ResponseCompleted"]
    assert provider.requests[1].messages[-1]["role"] == "tool"


async def test_a_stopped_turn_records_a_stop_and_keeps_its_text(tmp_path: Path) -> None:
    provider = ScriptedProvider().then("a", "b", "c", "d", delay=0.05)
    fake = FakeChat(provider, settings(tmp_path))
    turn = fake.turn()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(turn.run, fake.chat.context(10))
            while not fake.texts():  # noqa: ASYNC110 - the fake's record has no event
                await trio.sleep(0.01)
            turn.stop()
    assert fake.kinds()[-1] == "ResponseStopped"
    assert fake.chat.outcomes[fake.response_id].text == "".join(t for t, _ in fake.texts())
    assert fake.texts()[0] == ("a", 0)


async def test_a_turn_whose_chat_is_fenced_stops_writing(tmp_path: Path) -> None:
    provider = ScriptedProvider().then("a", "b")
    fake = FakeChat(provider, settings(tmp_path))
    fake.fenced = True
    turn = fake.turn()
    with trio.fail_after(5):
        await turn.run(fake.chat.context(10))
    assert turn.abandoned and fake.recorded == []
    assert fake.chat.current is not None  # left open for the chat's next owner
