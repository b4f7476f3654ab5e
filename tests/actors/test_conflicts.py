"""A save that conflicts with another writer's reloads and decides again: a turn's text is
never appended a second time at a new offset."""

from __future__ import annotations

import trio

from app.config import Settings
from app.events.domain import ChatSession
from app.events.errors import ConcurrencyError
from app.events.store import EventStore

from .conftest import ScriptedProvider, stored_events, wait_until
from .test_system import until_answered


async def test_a_turn_never_appends_its_text_after_another_writers(
    start_system, settings: Settings, provider: ScriptedProvider
) -> None:
    words = [f"a{i} " for i in range(200)]
    system = await start_system(provider.then(*words, delay=0.01), token_flush_ms=40.0)
    chat_id = await system.create_chat("alice")
    await system.send_message(chat_id, "alice", "go")

    async def text_stored() -> bool:
        events = await stored_events(system, chat_id)
        return any(isinstance(e, ChatSession.TokensGenerated) for e in events)

    with trio.fail_after(5):
        while not await text_stored():  # noqa: ASYNC110 - polling the store
            await trio.sleep(0.005)
    # a writer that is not the chat's actor appends to the same reply, behind its back
    other = await trio.to_thread.run_sync(EventStore.open, settings)
    with trio.fail_after(5):
        while True:
            chat = await other.get(chat_id)
            assert chat.current is not None
            chat.record_tokens(chat.current.response_id, "<OTHER>", 1)
            try:
                await other.save(chat)
                break
            except ConcurrencyError:
                continue
    other.close()

    types = await until_answered(system, chat_id)
    assert types[-1] == "ResponseInterrupted"
    events = await stored_events(system, chat_id)
    assert events[-1].reason == "owner_lost"
    text = (await system.store.get(chat_id)).history[-1]["content"]
    # the actor's text before the other writer's, then the other's, and nothing after
    assert text.endswith("<OTHER>") and text.count("<OTHER>") == 1
    assert "".join(words).startswith(text.removesuffix("<OTHER>"))
    assert provider.closed == 1  # its model call was closed at once
    await wait_until(lambda: system.counts()["generating"] == 0)
    print(f"stored reply after a foreign write: {len(text)} characters")
