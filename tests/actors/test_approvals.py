"""A tool call waiting for a person's decision, in the actor system: it holds neither the
chat nor the user's generating slots, and a stop still ends it."""

from __future__ import annotations

import pytest
import trio

from app.events.errors import ToolCallNotFoundError

from .conftest import ScriptedProvider, event_types, stored_events
from .test_system import until_answered


async def test_a_waiting_call_blocks_no_chat_and_a_stop_ends_it(
    start_system, provider: ScriptedProvider
) -> None:
    provider.then(tool_calls=[("c1", "calculator", '{"expression": "6*7"}')])
    provider.then("hello from the other chat")
    system = await start_system(provider, approval_tools=("calculator",))
    waiting = await system.create_chat("alice")
    await system.send_message(waiting, "alice", "what is 6*7")

    with trio.fail_after(10):
        while "ToolApprovalRequested" not in await event_types(system, waiting):  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert system.generating_for("alice") == 0  # a waiting response is not generating

    other = await system.create_chat("alice")  # another chat answers meanwhile
    await system.send_message(other, "alice", "hi")
    assert (await until_answered(system, other))[-1] == "ResponseCompleted"
    # the waiting chat still records messages (its lock is free); they wait their turn
    accepted = await system.send_message(waiting, "alice", "and then?")
    assert accepted.seq > 0

    assert await system.stop_generation(waiting, "alice") is True
    types = await until_answered(system, waiting, answers=2)
    first_end = next(t for t in types if t.startswith("Response") and t != "ResponseStarted")
    assert first_end == "ResponseStopped"
    assert "ToolCompleted" not in types and "ToolDecided" not in types  # never run
    events = await stored_events(system, waiting)
    call_id = next(e.call_id for e in events if type(e).__name__ == "ToolApprovalRequested")
    with pytest.raises(ToolCallNotFoundError):  # its response ended: nothing waits
        await system.decide_tool(waiting, "alice", call_id, True)
