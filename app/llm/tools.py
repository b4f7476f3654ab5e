"""The tool registry and the built-in tools (``calculator``, ``current_time``).

A tool is a ``ToolSpec`` (what the model sees) and ``async def fn(arguments, context)`` that
returns something JSON-able. Other packages add their tools to the registry built by
``default_registry`` (the projections add ``search_chats``), in the app factory. A
``ToolSource`` adds tools that come and go (the MCP servers' tools, ``app.llm.mcp``): they
are offered beside the registered ones (which win a clash of names), and the registry's
``run`` runs the sources' own tasks.

``ToolRegistry.call`` raises only ``app.llm.errors.ToolError``s (their messages are meant to be
given back to the model) and ``trio.Cancelled``, which always propagates.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import trio

from app.config import Settings
from app.llm.base import ToolContext, ToolSpec
from app.llm.errors import (
    ToolArgumentsError,
    ToolError,
    ToolExecutionError,
    ToolTimeoutError,
    UnknownToolError,
)

ToolFunction = Callable[[dict[str, Any], ToolContext], Awaitable[Any]]
#: The registry's own call: ``(name, raw_arguments, context) -> result``.
ToolCall = Callable[[str, str, ToolContext], Awaitable[Any]]
#: Runs a call around the registry's own (telemetry): ``(name, raw_arguments, context, call)``.
ToolCallWrapper = Callable[[str, str, ToolContext, ToolCall], Awaitable[Any]]


class ToolSource(Protocol):
    """Tools that come and go: ``tools()`` is read at each turn and each call; ``run`` keeps
    them (until cancelled) and reports started once they are first known."""

    def tools(self) -> Mapping[str, tuple[ToolSpec, ToolFunction]]: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


class ToolRegistry:
    """Named tools and tool sources; each call is bounded by ``timeout_s``."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._tools: dict[str, tuple[ToolSpec, ToolFunction]] = {}
        self.sources: list[ToolSource] = []
        #: Wraps every call (None: none); it must call through and let errors pass.
        self.wrapper: ToolCallWrapper | None = None

    def register(self, spec: ToolSpec, fn: ToolFunction) -> None:
        """Adds a tool; a second tool with the same name is a programming error (ValueError)."""
        if spec.name in self._tools:
            raise ValueError(f"a tool named {spec.name!r} is already registered")
        self._tools[spec.name] = (spec, fn)

    def add_source(self, source: ToolSource) -> None:
        """Offers ``source``'s tools too, once ``run`` runs it."""
        self.sources.append(source)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs the sources until cancelled (returns at once when there is none); reports
        started once each has."""
        async with trio.open_nursery() as nursery:
            for source in self.sources:
                await nursery.start(source.run)
            task_status.started()

    def specs(self) -> tuple[ToolSpec, ...]:
        return tuple(spec for spec, _ in self._all().values())

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def _all(self) -> dict[str, tuple[ToolSpec, ToolFunction]]:
        if not self.sources:
            return self._tools
        found: dict[str, tuple[ToolSpec, ToolFunction]] = {}
        for source in self.sources:
            found.update(source.tools())
        return {**found, **self._tools}

    def parse_arguments(self, name: str, raw: str) -> dict[str, Any]:
        """Decodes and checks the model's arguments against the tool's JSON schema.

        Raises ``UnknownToolError`` or ``ToolArgumentsError``.
        """
        spec, _ = self._lookup(name)
        try:
            arguments = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise ToolArgumentsError(f"{name}: arguments are not valid JSON ({exc})") from exc
        except RecursionError as exc:
            raise ToolArgumentsError(f"{name}: arguments are nested too deeply") from exc
        if not isinstance(arguments, dict):
            raise ToolArgumentsError(f"{name}: arguments must be a JSON object")
        problem = schema_problem(spec.parameters, arguments)
        if problem:
            raise ToolArgumentsError(f"{name}: {problem}")
        return arguments

    async def call(self, name: str, raw_arguments: str, context: ToolContext) -> Any:
        """Parses the arguments and runs the tool within ``timeout_s``.

        Raises ``UnknownToolError``, ``ToolArgumentsError``, ``ToolTimeoutError``, or
        ``ToolExecutionError`` for anything else the tool raised (or a result that is not
        JSON-able); a ``ToolError`` the tool raises itself passes through unchanged.
        """
        if self.wrapper is not None:
            return await self.wrapper(name, raw_arguments, context, self._call)
        return await self._call(name, raw_arguments, context)

    async def _call(self, name: str, raw_arguments: str, context: ToolContext) -> Any:
        arguments = self.parse_arguments(name, raw_arguments)
        _, fn = self._lookup(name)
        try:
            with trio.fail_after(self.timeout_s):
                result = await fn(arguments, context)
            json.dumps(result)
        except trio.TooSlowError as exc:
            raise ToolTimeoutError(f"{name} did not finish within {self.timeout_s} s") from exc
        except ToolError:
            raise
        except Exception as exc:
            raise ToolExecutionError(f"{name} failed: {exc}") from exc
        return result

    def _lookup(self, name: str) -> tuple[ToolSpec, ToolFunction]:
        tools = self._all()
        try:
            return tools[name]
        except KeyError:
            known = ", ".join(sorted(tools)) or "none"
            raise UnknownToolError(f"there is no tool named {name!r} (known: {known})") from None


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def schema_problem(schema: dict[str, Any], value: Any, where: str = "arguments") -> str | None:
    """What is wrong with ``value`` under the ``type``/``required``/``properties``/``enum``/
    ``additionalProperties: false`` subset of JSON schema, or None."""
    kinds = schema.get("type")
    if kinds is not None:
        names = [kinds] if isinstance(kinds, str) else list(kinds)
        is_bool = isinstance(value, bool)
        if not any(
            isinstance(value, _JSON_TYPES.get(n, object)) and (n == "boolean") == is_bool
            for n in names
        ):
            return f"{where} must be of type {' or '.join(names)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}"
    if isinstance(value, dict):
        return _object_problem(schema, value, where)
    return None


def _object_problem(schema: dict[str, Any], value: dict[str, Any], where: str) -> str | None:
    missing = [key for key in schema.get("required", ()) if key not in value]
    if missing:
        return f"{where} lack required {', '.join(missing)}"
    properties = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        unknown = sorted(set(value) - set(properties))
        if unknown:
            return f"{where} have unknown {', '.join(unknown)}"
    for key, sub in properties.items():
        if key in value:
            problem = schema_problem(sub, value[key], f"{key!r}")
            if problem:
                return problem
    return None


# -- calculator -----------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 10_000
MAX_RESULT_DIGITS = 1_000
#: Up to this length an expression is evaluated on the event loop: a hop to a worker thread
#: costs about 0.05 ms, as much as evaluating 100 characters of the slowest arithmetic.
INLINE_EXPRESSION_CHARS = 100
CALCULATOR_THREADS = 2

CALCULATOR = ToolSpec(
    name="calculator",
    description="Evaluates an arithmetic expression: numbers, + - * / // % ** and parentheses.",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "for example (3+4)*2"}},
        "required": ["expression"],
        "additionalProperties": False,
    },
)

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def evaluate(expression: str, max_chars: int = MAX_EXPRESSION_CHARS) -> int | float:
    """Evaluates arithmetic safely (no names, calls or attributes; bounded sizes), in time
    linear in ``len(expression)``.

    Raises ``ToolArgumentsError`` for what is not plain arithmetic, longer than ``max_chars``,
    nested too deeply or too big to compute, and ``ToolExecutionError`` for division by zero
    and results that are not finite real numbers.
    """
    if len(expression) > max_chars:
        raise ToolArgumentsError(f"the expression is longer than {max_chars} characters")
    try:
        result = _evaluate(_parse(expression).body)
    except ZeroDivisionError as exc:
        raise ToolExecutionError("division by zero") from exc
    except OverflowError as exc:
        raise ToolExecutionError("the result is too large") from exc
    except RecursionError as exc:
        raise ToolArgumentsError("the expression is nested too deeply") from exc
    if isinstance(result, complex) or (isinstance(result, float) and not math.isfinite(result)):
        raise ToolExecutionError("the result is not a finite real number")
    return result


def _parse(expression: str) -> ast.Expression:
    try:
        return ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolArgumentsError(f"not an arithmetic expression: {expression!r}") from exc
    except (RecursionError, MemoryError) as exc:  # how the parser refuses very deep nesting
        raise ToolArgumentsError("the expression is nested too deeply") from exc


def _evaluate(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, int) and result.bit_length() > MAX_RESULT_DIGITS * 3.33:
            raise ToolArgumentsError(f"the result would have more than {MAX_RESULT_DIGITS} digits")
        return result
    raise ToolArgumentsError(
        f"only numbers, + - * / // % ** and parentheses are allowed (not {type(node).__name__})"
    )


def _check_power(base: Any, exponent: Any) -> None:
    """Refuses powers too big to compute, before computing them."""
    if isinstance(exponent, complex) or isinstance(base, complex):
        raise ToolExecutionError("the result is not a finite real number")
    if abs(exponent) > MAX_EXPONENT:
        raise ToolArgumentsError(f"exponents above {MAX_EXPONENT} are not allowed")
    if abs(base) > 1 and exponent > 0:
        digits = exponent * math.log10(abs(base))
        if digits > MAX_RESULT_DIGITS:
            raise ToolArgumentsError(f"the result would have more than {MAX_RESULT_DIGITS} digits")


class Calculator:
    """The ``calculator`` tool.

    Short expressions are evaluated on the event loop; longer ones in a worker thread, at most
    ``threads`` at a time, which the registry's timeout abandons (the evaluation is pure).
    """

    def __init__(self, threads: int = CALCULATOR_THREADS) -> None:
        self._limiter = trio.CapacityLimiter(threads)

    async def __call__(self, arguments: dict[str, Any], context: ToolContext) -> int | float:
        expression = arguments["expression"]
        if not INLINE_EXPRESSION_CHARS < len(expression) <= MAX_EXPRESSION_CHARS:
            return evaluate(expression)  # short, or refused at once for its length
        return await trio.to_thread.run_sync(
            evaluate, expression, limiter=self._limiter, abandon_on_cancel=True
        )


# -- current_time ---------------------------------------------------------------------------

CURRENT_TIME = ToolSpec(
    name="current_time",
    description="The current date and time in a time zone (IANA name, default UTC).",
    parameters={
        "type": "object",
        "properties": {"timezone": {"type": "string", "description": "for example Europe/Paris"}},
        "additionalProperties": False,
    },
)


async def current_time(arguments: dict[str, Any], context: ToolContext) -> dict[str, str]:
    name = arguments.get("timezone") or "UTC"
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ToolArgumentsError(f"unknown time zone {name!r}") from exc
    return {"iso": datetime.now(zone).isoformat(timespec="seconds"), "timezone": name}


def default_registry(settings: Settings) -> ToolRegistry:
    """A registry with the built-in tools and the tools of ``settings.mcp_servers``, bounded
    by ``settings.tool_timeout_s``."""
    registry = ToolRegistry(timeout_s=settings.tool_timeout_s)
    registry.register(CALCULATOR, Calculator())
    registry.register(CURRENT_TIME, current_time)
    if settings.mcp_servers:
        from .mcp import McpTools  # the SDK is loaded only when a server is configured

        registry.add_source(McpTools(settings.mcp_servers))
    return registry
