"""The offline provider: deterministic local replies, tools and test triggers."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
import trio
import trio.testing

from app.config import Settings
from app.llm import build_provider
from app.llm.base import (
    Finish,
    ModelRequest,
    StreamItem,
    TextDelta,
    ToolCallRequest,
    ToolContext,
    Usage,
    assistant_tool_calls,
    estimate_tokens,
)
from app.llm.errors import ProviderStreamError
from app.llm.offline import OfflineProvider, find_expression, plan_reply, tokenize
from app.llm.tools import default_registry

from .timing import best_time

SETTINGS = Settings(provider="offline", offline_token_delay_s=0)
TOOLS = default_registry(SETTINGS).specs()
CONTEXT = ToolContext(owner="alice", chat_id="chat-1")
#: The message that froze the server for seconds when finding an expression was quadratic.
FINDING = "what is 1+" + " " * 20_000 + "("


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def collect(
    request: ModelRequest, settings: Settings = SETTINGS, into: list[StreamItem] | None = None
) -> list[StreamItem]:
    items = [] if into is None else into
    provider = OfflineProvider(settings)
    with trio.fail_after(30):
        async with provider.stream(request) as stream:
            async for item in stream:
                items.append(item)
    return items


def text_of(items: list[StreamItem]) -> str:
    return "".join(item.text for item in items if isinstance(item, TextDelta))


async def test_replies_are_deterministic_and_echo_the_message() -> None:
    request = ModelRequest([user("Tell me about event sourcing with trio actors")])
    first, second = await collect(request), await collect(request)
    other = await collect(ModelRequest([user("How do sailboats tack upwind?")]))

    assert text_of(first) == text_of(second)
    assert text_of(first) != text_of(other)
    assert 'You said: "Tell me about event sourcing with trio actors".' in text_of(first)
    assert first[-1] == Finish("stop", "offline")


async def test_streams_word_pieces_and_counts_usage_exactly() -> None:
    request = ModelRequest([{"role": "system", "content": "Be brief."}, user("Hello there")])
    items = await collect(request)
    deltas = [item for item in items if isinstance(item, TextDelta)]
    usage = items[-2]

    assert len(deltas) > 10
    assert all(0 < len(delta.text.strip()) <= 6 for delta in deltas)
    assert isinstance(usage, Usage) and usage.estimated is False
    assert usage.completion_tokens == len(deltas)
    assert usage.prompt_tokens == estimate_tokens(["Be brief.", "Hello there"])


async def test_tokens_are_spaced_by_the_configured_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = SETTINGS.replace(offline_token_delay_s=0.01)
    arrivals: list[float] = []
    provider = OfflineProvider(settings)
    async with provider.stream(ModelRequest([user("/tokens 20")])) as stream:
        started = trio.current_time()
        async for item in stream:
            if isinstance(item, TextDelta):
                arrivals.append(trio.current_time() - started)

    assert len(arrivals) == 20
    assert arrivals[0] == pytest.approx(0.01)
    assert arrivals[-1] == pytest.approx(0.20)


async def test_tokens_trigger_streams_exactly_that_many() -> None:
    items = await collect(ModelRequest([user("/tokens 500")]))
    deltas = [item for item in items if isinstance(item, TextDelta)]

    assert len(deltas) == 500
    assert items[-2].completion_tokens == 500  # type: ignore[union-attr]


async def test_fail_trigger_breaks_the_stream_after_a_few_tokens() -> None:
    items: list[StreamItem] = []
    with pytest.raises(ProviderStreamError):
        await collect(ModelRequest([user("/fail")]), into=items)

    assert len(items) == 3 and all(isinstance(item, TextDelta) for item in items)


async def test_slow_trigger_can_be_stopped(autojump_clock: trio.testing.MockClock) -> None:
    received: list[StreamItem] = []
    provider = OfflineProvider(SETTINGS)
    started = trio.current_time()
    with trio.move_on_after(0.26) as stop:
        async with provider.stream(ModelRequest([user("/slow")])) as stream:
            async for item in stream:
                received.append(item)

    assert stop.cancelled_caught
    assert len(received) == 5  # 50 ms apart, whatever offline_token_delay_s says
    assert trio.current_time() - started == pytest.approx(0.26)


async def test_calculator_round_trip() -> None:
    registry = default_registry(SETTINGS)
    question = [user("Quick one: what is 12*7?")]
    first = await collect(ModelRequest(question, tools=TOOLS))
    call = first[0]

    assert isinstance(call, ToolCallRequest) and call.name == "calculator"
    assert json.loads(call.arguments) == {"expression": "12*7"}
    assert first[-1] == Finish("tool_calls", "offline")

    result = await registry.call(call.name, call.arguments, CONTEXT)
    followup = [
        *question,
        assistant_tool_calls([call]),
        {"role": "tool", "tool_call_id": call.call_id, "content": json.dumps(result)},
    ]
    second = await collect(ModelRequest(followup, tools=TOOLS))

    assert text_of(second) == "12*7 = 84."
    assert second[-1] == Finish("stop", "offline")


async def test_current_time_round_trip() -> None:
    registry = default_registry(SETTINGS)
    question = [user("What time is it in Europe/Paris?")]
    first = await collect(ModelRequest(question, tools=TOOLS))
    call = first[0]

    assert isinstance(call, ToolCallRequest) and call.name == "current_time"
    assert json.loads(call.arguments) == {"timezone": "Europe/Paris"}

    result = await registry.call(call.name, call.arguments, CONTEXT)
    followup = [
        *question,
        assistant_tool_calls([call]),
        {"role": "tool", "tool_call_id": call.call_id, "content": json.dumps(result)},
    ]
    answer = text_of(await collect(ModelRequest(followup, tools=TOOLS)))
    moment = datetime.fromisoformat(result["iso"])

    assert answer == f"It is {moment:%H:%M} on {moment:%A %d %B %Y} (Europe/Paris)."


async def test_a_failed_tool_is_reported_in_words() -> None:
    messages = [
        user("what is 1/0"),
        assistant_tool_calls([ToolCallRequest("c1", "calculator", '{"expression": "1/0"}')]),
        {"role": "tool", "tool_call_id": "c1", "content": '{"error": "division by zero"}'},
    ]
    answer = text_of(await collect(ModelRequest(messages, tools=TOOLS)))

    assert answer == "I could not use calculator: division by zero."


async def test_no_tool_call_when_the_tool_is_not_offered() -> None:
    items = await collect(ModelRequest([user("what is 12*7")]))

    assert not any(isinstance(item, ToolCallRequest) for item in items)
    assert "12*7" in text_of(items)


@pytest.mark.parametrize(
    ("text", "expression"),
    [
        ("what is 12*7", "12*7"),
        ("compute (3+4)/2 please.", "(3+4)/2"),
        ("and 2^10?", "2**10"),
        ("what is 12 * 7?", "12 * 7"),
        ("I have 3 apples", None),
        ("GPT-4 is a model", None),
        ("what is 12 *\n\t 7?", "12 * 7"),
        ("what is 1+" + " " * 20_000 + "2", "1+ 2"),
        ("(" * 5_000 + "3+4)*2", "(3+4)*2"),
        ("add " + "1+" * 150 + "1, or just 2*3", "2*3"),  # too long for the calculator
        (FINDING, None),
    ],
)
def test_finds_arithmetic_in_prose(text: str, expression: str | None) -> None:
    assert find_expression(text) == expression


def test_build_provider_picks_offline() -> None:
    provider = build_provider(SETTINGS)

    assert provider.name == "offline" and provider.default_model == "offline"


def slowdown(work: Callable[[str], object], build: Callable[[int], str], n: int = 2_000) -> float:
    """How many times longer ``work`` takes on ``build(10 * n)`` than on ``build(n)``: about
    10 when it is linear. The best of a few runs each, so that a busy machine does not count."""
    small, large = build(n), build(10 * n)
    return best_time(work, large) / best_time(work, small)


def plan(text: str) -> object:
    return plan_reply(ModelRequest([user(text)], tools=TOOLS), 0)


ADVERSARIAL = {
    "spaces": lambda n: "what is 1+" + " " * n + "(",
    "tabs": lambda n: "what is 1+" + "\t" * n + "(",
    "spaced parentheses": lambda n: "( " * (n // 2) + "1+1",
    "open parentheses": lambda n: "(" * n + "1+1",
    "closing parentheses": lambda n: "1+1" + ")" * n,
    "digits": lambda n: "/tokens " + "9" * n,
}


@pytest.mark.parametrize("build", ADVERSARIAL.values(), ids=ADVERSARIAL)
def test_planning_time_is_linear_in_the_message(build: Callable[[int], str]) -> None:
    assert slowdown(plan, build) < 30


def test_tokenizing_time_is_linear_in_the_text() -> None:
    assert slowdown(tokenize, lambda n: "word" + " " * n) < 30


async def test_a_long_message_makes_a_short_reply() -> None:
    long_word = "Supercalifragilistic" * 1_000
    text = f"Tell me about {long_word} and {'x' * 20_000}"
    reply = text_of(await collect(ModelRequest([user(text)], tools=TOOLS)))

    assert reply.startswith('You said: "Tell me about Supercalifragilistic')
    assert len(reply) < 600


async def test_long_words_are_not_taken_for_time_zones() -> None:
    text = "what time is it in Europe/" + "P" * 50 + ", or in Asia/Tokyo"
    call = (await collect(ModelRequest([user(text)], tools=TOOLS)))[0]

    assert isinstance(call, ToolCallRequest)
    assert json.loads(call.arguments) == {"timezone": "Asia/Tokyo"}


async def test_a_long_message_is_planned_like_a_short_one() -> None:
    prose = "Event sourcing keeps every change as a fact. " * 200
    items = await collect(ModelRequest([user(prose + "So, what is 12*7?")], tools=TOOLS))
    call = items[0]

    assert isinstance(call, ToolCallRequest)
    assert json.loads(call.arguments) == {"expression": "12*7"}


@pytest.mark.parametrize(
    "text", [FINDING, "what is 1+" + "\t" * 31_000 + "("], ids=["spaces", "tabs"]
)
async def test_the_loop_stays_responsive_while_a_long_message_is_answered(text: str) -> None:
    ticks: list[float] = []

    async def tick(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ticks.append(trio.current_time())
        task_status.started()
        while True:
            await trio.sleep(0.01)
            ticks.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(tick)
        items = await collect(ModelRequest([user(text)], tools=TOOLS))
        ticks.append(trio.current_time())
        nursery.cancel_scope.cancel()

    assert items[-1] == Finish("stop", "offline")
    assert max(later - earlier for earlier, later in itertools.pairwise(ticks)) < 0.2
