"""The tool registry and the built-in tools."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio.testing

from app.config import Settings
from app.llm.base import ToolContext, ToolSpec
from app.llm.errors import (
    ToolArgumentsError,
    ToolError,
    ToolExecutionError,
    ToolTimeoutError,
    UnknownToolError,
)
from app.llm.tools import INLINE_EXPRESSION_CHARS, ToolRegistry, default_registry, evaluate

from .timing import best_time

CONTEXT = ToolContext(owner="alice", chat_id="chat-1")
ANY_OBJECT = ToolSpec("slow", "Sleeps.", {"type": "object"})


@pytest.fixture
def registry() -> ToolRegistry:
    return default_registry(Settings(tool_timeout_s=1.0))


async def calculate(registry: ToolRegistry, expression: str) -> Any:
    return await registry.call("calculator", json.dumps({"expression": expression}), CONTEXT)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("12*7", 84),
        ("(3+4)/2", 3.5),
        ("2**10", 1024),
        ("-3 + +5", 2),
        ("7 // 2", 3),
        ("7 % 4", 3),
        ("1.5 * 2", 3.0),
        ("2 ** -1", 0.5),
        ("10 - 2 - 3", 5),
    ],
)
async def test_calculator_computes(registry: ToolRegistry, expression: str, expected: Any) -> None:
    result = await calculate(registry, expression)

    assert result == expected and type(result) is type(expected)


async def test_calculator_refuses_huge_powers_quickly(registry: ToolRegistry) -> None:
    started = time.perf_counter()
    for expression in ("9**9**9", "10**100000", "(10**999)**(10**999)", "2**4000"):
        with pytest.raises(ToolArgumentsError, match="exponent|digits"):
            await calculate(registry, expression)

    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "os.system('ls')",
        "x + 1",
        "[1, 2]",
        "1 if 1 else 2",
        "True + 1",
        "'a' * 3",
        "1 << 8",
        "lambda: 1",
        "12*7; 1",
    ],
)
async def test_calculator_refuses_anything_but_arithmetic(
    registry: ToolRegistry, expression: str
) -> None:
    with pytest.raises(ToolArgumentsError):
        await calculate(registry, expression)


async def test_calculator_refuses_long_expressions(registry: ToolRegistry) -> None:
    with pytest.raises(ToolArgumentsError, match="200 characters"):
        await calculate(registry, "+".join(["1"] * 101))


@pytest.mark.parametrize(
    "expression",
    ["(" * 10_000, "+" * 10_000 + "1", "-" * 10_000 + "1", "1+" * 5_000 + "1", "2**" * 2_000 + "1"],
    ids=["parentheses", "plus signs", "minus signs", "additions", "powers"],
)
def test_deep_nesting_is_refused_as_arguments(expression: str) -> None:
    # Allowed past MAX_EXPRESSION_CHARS, the parser and the evaluation give up on depth.
    with pytest.raises(ToolArgumentsError, match="nested|not an arithmetic"):
        evaluate(expression, max_chars=len(expression))


def evaluate_any(expression: str) -> None:
    try:
        evaluate(expression, max_chars=len(expression))
    except ToolError:
        pass


@pytest.mark.parametrize(
    "build",
    [
        lambda n: "1+" + " " * n + "1",
        lambda n: "1+" + "\t" * n + "(",
        lambda n: "(" * n + "1",
        lambda n: "-" * n + "1",
        lambda n: "1+" * (n // 2) + "1",
        lambda n: "1" * n,
        lambda n: "1." + "5" * n,
    ],
    ids=["spaces", "tabs", "parentheses", "minus signs", "additions", "digits", "decimals"],
)
def test_evaluation_time_is_linear_in_the_expression(build: Callable[[int], str]) -> None:
    small, large = build(2_000), build(20_000)

    assert best_time(evaluate_any, large) / best_time(evaluate_any, small) < 30


async def test_long_expressions_are_computed_in_a_thread_bounded_by_the_timeout() -> None:
    expression = " + ".join(["(10**99)"] * 12)
    assert len(expression) > INLINE_EXPRESSION_CHARS

    assert await calculate(default_registry(Settings()), expression) == 12 * 10**99
    with pytest.raises(ToolTimeoutError):  # no time left to wait for the thread
        await calculate(default_registry(Settings(tool_timeout_s=0)), expression)


@pytest.mark.parametrize("expression", ["1/0", "5 % 0", "3 // 0", "0 ** -1"])
async def test_division_by_zero_is_an_execution_error(
    registry: ToolRegistry, expression: str
) -> None:
    with pytest.raises(ToolExecutionError, match="division by zero"):
        await calculate(registry, expression)


async def test_non_real_results_are_refused(registry: ToolRegistry) -> None:
    with pytest.raises(ToolExecutionError, match="finite real"):
        await calculate(registry, "(-8) ** 0.5")
    with pytest.raises(ToolExecutionError):
        await calculate(registry, "1e308 * 10")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ('{"expression": "1+1"', "not valid JSON"),
        ('["1+1"]', "JSON object"),
        ("{}", "required expression"),
        ('{"expression": 5}', "type string"),
        ('{"expression": "1", "mode": "x"}', "unknown mode"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # a model's garbage
    ],
)
async def test_bad_arguments_are_refused(registry: ToolRegistry, raw: str, problem: str) -> None:
    with pytest.raises(ToolArgumentsError, match=problem):
        await registry.call("calculator", raw, CONTEXT)


async def test_unknown_tool(registry: ToolRegistry) -> None:
    with pytest.raises(UnknownToolError, match="'delete_everything'"):
        await registry.call("delete_everything", "{}", CONTEXT)


async def test_a_slow_tool_times_out(autojump_clock: trio.testing.MockClock) -> None:
    registry = ToolRegistry(timeout_s=0.5)

    async def slow(arguments: dict[str, Any], context: ToolContext) -> str:
        await trio.sleep(60)
        return "too late"

    registry.register(ANY_OBJECT, slow)
    started = trio.current_time()
    with pytest.raises(ToolTimeoutError, match="0.5 s"):
        await registry.call("slow", "{}", CONTEXT)

    assert trio.current_time() - started == pytest.approx(0.5)


async def test_a_failing_tool_is_an_execution_error() -> None:
    registry = ToolRegistry()

    async def broken(arguments: dict[str, Any], context: ToolContext) -> Any:
        raise RuntimeError("index is offline")

    async def unserialisable(arguments: dict[str, Any], context: ToolContext) -> Any:
        return object()

    registry.register(ToolSpec("broken", "Fails.", {"type": "object"}), broken)
    registry.register(ToolSpec("odd", "Returns junk.", {"type": "object"}), unserialisable)
    with pytest.raises(ToolExecutionError, match="index is offline") as caught:
        await registry.call("broken", "{}", CONTEXT)
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(ToolExecutionError):
        await registry.call("odd", "{}", CONTEXT)


async def test_cancellation_is_never_swallowed() -> None:
    registry = ToolRegistry(timeout_s=10)
    started = trio.Event()

    async def waits(arguments: dict[str, Any], context: ToolContext) -> str:
        started.set()
        await trio.sleep_forever()
        return "never"

    registry.register(ANY_OBJECT, waits)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registry.call, "slow", "{}", CONTEXT)
            await started.wait()
            nursery.cancel_scope.cancel()

    assert nursery.cancel_scope.cancelled_caught


async def test_other_modules_can_register_tools(registry: ToolRegistry) -> None:
    seen: list[ToolContext] = []
    spec = ToolSpec(
        "search_chats",
        "Searches the user's chats.",
        {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    )

    async def search(arguments: dict[str, Any], context: ToolContext) -> list[str]:
        seen.append(context)
        return [f"hit for {arguments['query']}"]

    registry.register(spec, search)

    assert [s.name for s in registry.specs()] == ["calculator", "current_time", "search_chats"]
    assert await registry.call("search_chats", '{"query": "trio"}', CONTEXT) == ["hit for trio"]
    assert seen == [CONTEXT]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(spec, search)


async def test_current_time_defaults_to_utc(registry: ToolRegistry) -> None:
    result = await registry.call("current_time", "{}", CONTEXT)
    moment = datetime.fromisoformat(result["iso"])

    assert result["timezone"] == "UTC"
    assert moment.utcoffset() == timedelta(0)
    assert abs(moment - datetime.now(UTC)) < timedelta(seconds=5)


async def test_current_time_in_a_zone(registry: ToolRegistry) -> None:
    result = await registry.call("current_time", '{"timezone": "Asia/Kolkata"}', CONTEXT)
    moment = datetime.fromisoformat(result["iso"])

    assert result["timezone"] == "Asia/Kolkata"
    assert moment.utcoffset() == timedelta(hours=5, minutes=30)


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "Europe"])
async def test_current_time_refuses_unknown_zones(registry: ToolRegistry, zone: str) -> None:
    with pytest.raises(ToolArgumentsError, match="unknown time zone"):
        await registry.call("current_time", json.dumps({"timezone": zone}), CONTEXT)
