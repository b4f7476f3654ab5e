"""Actor-system fixtures: a real store on each backend, and a scripted model at the seam."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from app.actors import ActorSystem
from app.config import Settings
from app.events.store import EventStore
from app.llm.base import Finish, ModelRequest, StreamItem, TextDelta, ToolCallRequest, Usage
from app.llm.errors import ProviderStreamError
from app.llm.tools import default_registry


@dataclass
class Script:
    """What the scripted model answers to one request."""

    tokens: list[str] = field(default_factory=list)
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    delay: float = 0.0
    fail_after: int | None = None


class ScriptedProvider:
    """A model whose answers are queued by the test; records every request it got."""

    name = "scripted"

    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.requests: list[ModelRequest] = []
        self.closed = 0
        self.started = trio.Event()

    @property
    def default_model(self) -> str:
        return "scripted-1"

    def then(self, *tokens: str, **kwargs: Any) -> ScriptedProvider:
        self.scripts.append(Script(list(tokens), **kwargs))
        return self

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[StreamItem]]:
        self.requests.append(request)
        script = self.scripts.pop(0) if self.scripts else Script(["ok"])
        try:
            async with aclosing(self._items(script)) as items:
                yield items
        finally:
            self.closed += 1

    async def _items(self, script: Script) -> AsyncIterator[StreamItem]:
        self.started.set()
        for index, token in enumerate(script.tokens):
            if script.fail_after is not None and index == script.fail_after:
                raise ProviderStreamError("upstream closed the stream")
            await trio.sleep(script.delay)
            yield TextDelta(token)
        for call_id, name, arguments in script.tool_calls:
            yield ToolCallRequest(call_id, name, arguments)
        yield Usage(prompt_tokens=10, completion_tokens=len(script.tokens))
        yield Finish("tool_calls" if script.tool_calls else "stop", "scripted-1")

    async def aclose(self) -> None:
        pass


@pytest.fixture
def provider() -> ScriptedProvider:
    return ScriptedProvider()


@pytest.fixture
async def start_system(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    """Starts an ActorSystem on ``settings`` (with overrides); ``stop`` cancels them all."""
    stores: list[EventStore] = []
    async with trio.open_nursery() as nursery:

        async def start(provider: Any, **overrides: Any) -> ActorSystem:
            s = settings.replace(**overrides)
            store = await trio.to_thread.run_sync(EventStore.open, s)
            stores.append(store)
            system = ActorSystem(s, store, provider, default_registry(s))
            scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with scope:
                    await system.run(task_status=task_status)

            await nursery.start(run)
            system.test_scope = scope  # type: ignore[attr-defined]
            return system

        yield start
        nursery.cancel_scope.cancel()
    for store in stores:
        store.close()


async def stop_system(system: ActorSystem) -> None:
    """Cancels a running system as a crash would (nothing recorded on the way out)."""
    system.test_scope.cancel()  # type: ignore[attr-defined]
    await wait_until(lambda: system._nursery is None)


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event
            await trio.sleep(0.005)


async def event_types(system: ActorSystem, chat_id: Any) -> list[str]:
    events = await system.store.run(lambda: list(system.store.app.events.get(chat_id)))
    return [type(e).__name__ for e in events]


async def stored_events(system: ActorSystem, chat_id: Any) -> list[Any]:
    return await system.store.run(lambda: list(system.store.app.events.get(chat_id)))
