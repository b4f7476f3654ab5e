"""The offline provider: a small deterministic text generator, with no network and no key.

It streams word pieces (with their spaces) one token at a time, ``offline_token_delay_s``
apart, and counts usage exactly. The same conversation always gets the same reply: it echoes
the user's last message and adds a few sentences chosen from it (seeded by its text).

Tools, when the request offers them:

- a message with an arithmetic expression (``what is 12*7``, ``compute (3+4)/2``, ``2^10``)
  calls ``calculator`` with ``{"expression": "12*7"}`` and finishes with ``tool_calls``;
- a question about the time or date (``what time is it``, ``the date in Europe/Paris``)
  calls ``current_time`` (with ``timezone`` when the message names one);
- when the messages end with tool results, it answers with them (``12*7 = 84.``).

Reading a message takes time linear in its length, whatever it holds (long runs of spaces,
tabs, parentheses or digits, long words). Tool detection proposes only what the tools can
take (expressions of at most ``MAX_EXPRESSION_CHARS`` characters, zone names made of short
parts), and a reply echoes at most 200 characters and no word longer than 40, so a long
message does not make a long reply. A request whose text is longer than
``INLINE_PLAN_CHARS`` is planned in a worker thread, at most two at a time per provider.

Triggers, when the last user message starts with them (for tests and demos):

``/tokens N``  streams exactly N tokens (N at most 100,000);
``/fail``      streams 3 tokens, then raises ``ProviderStreamError``;
``/slow``      streams 200 tokens 50 ms apart, whatever the settings (to try stop).

Cancellation (a stop) ends the stream at once; nothing needs closing.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import trio

from app.config import Settings
from app.llm.base import (
    Finish,
    ModelRequest,
    StreamItem,
    TextDelta,
    ToolCallRequest,
    Usage,
    estimate_tokens,
    message_texts,
)
from app.llm.errors import ProviderStreamError
from app.llm.tools import MAX_EXPRESSION_CHARS

MODEL = "offline"
MAX_TRIGGER_TOKENS = 100_000
SLOW_TOKENS = 200
SLOW_DELAY_S = 0.05
FAIL_AFTER_TOKENS = 3
#: Planning 1,000 characters of prose takes about 0.08 ms (0.3 ms at worst), about what a hop
#: to a worker thread and back costs; shorter requests are planned on the event loop.
INLINE_PLAN_CHARS = 1_000
PLANNING_THREADS = 2
_MAX_KEYWORD_CHARS = 40

_LOREM = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
_STOPWORDS = frozenset(
    "about after again also because been before being could does doing from have into just "
    "like more most much only other over same should some such than that their them then there "
    "these they this those through very want what when where which while will with would your "
    "please tell know".split()
)
_THOUGHTS = (
    "That is a good question about {kw}.",
    "When it comes to {kw}, the details matter most.",
    "There are a few ways to look at {kw}.",
    "{Kw} is worth a closer look.",
    "A short answer about {kw} would leave out too much.",
    "I would start with what you already know about {kw}.",
)
_CLOSERS = (
    "I am the offline model, so this reply was generated locally, without a language model.",
    "Set OPENAI_BASE_URL to get a real model's answer.",
    "Ask me to compute something, such as 12*7, and I will use the calculator.",
)
_EXPRESSION_RUN = re.compile(r"[-+(\d.][\d\s.+\-*/%()^]*")
# The possessive ``*+`` never gives back what it took: ``\s*[-+(\s]*`` tried every split of a
# run of spaces between its two parts, which made a search quadratic in the run's length.
_HAS_OPERATION = re.compile(r"[\d.)]\s*+(?:\*\*|//|[-+*/%])[-+(\s]*+[\d.]")
_OPEN_PAREN = re.compile(r"\(\s*")
_CLOSE_PAREN = re.compile(r"\)\s*")  # on the reversed expression
_TIME_QUESTION = re.compile(
    r"\b(what time|the time|time is it|current time|what day|today'?s date|the date|what date)\b",
    re.IGNORECASE,
)
_ZONE_PART = r"[A-Z][A-Za-z_]{1,31}"  # IANA names are made of short parts
_ZONE = re.compile(rf"\b(UTC|{_ZONE_PART}/{_ZONE_PART}(?:/{_ZONE_PART})?)\b")
_TOKENS_TRIGGER = re.compile(r"/tokens\s+(\d+)\b")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")


@dataclass(frozen=True, slots=True)
class _Plan:
    tokens: list[str]
    delay_s: float
    tool_call: ToolCallRequest | None = None
    fail_after: int | None = None


class OfflineProvider:
    """Deterministic local replies; see the module docstring."""

    name = "offline"

    def __init__(self, settings: Settings) -> None:
        self._delay_s = settings.offline_token_delay_s
        self._planners = trio.CapacityLimiter(PLANNING_THREADS)

    @property
    def default_model(self) -> str:
        return MODEL

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[StreamItem]]:
        """Streams the planned reply; raises ``ProviderStreamError`` only for ``/fail``.

        Cancelled while a worker thread plans a long request, it returns at once and leaves
        the thread to finish on its own (planning is pure and takes milliseconds).
        """
        items = self._items(request, await self._plan(request))
        try:
            yield items
        finally:
            await items.aclose()

    async def aclose(self) -> None:
        """Nothing to release."""

    async def _plan(self, request: ModelRequest) -> _Plan:
        if planned_chars(request.messages) <= INLINE_PLAN_CHARS:
            return plan_reply(request, self._delay_s)
        return await trio.to_thread.run_sync(
            plan_reply, request, self._delay_s, limiter=self._planners, abandon_on_cancel=True
        )

    async def _items(self, request: ModelRequest, plan: _Plan) -> AsyncGenerator[StreamItem, None]:
        cut = request.max_tokens is not None and len(plan.tokens) > request.max_tokens
        if cut:
            plan = _Plan(plan.tokens[: request.max_tokens], plan.delay_s, None, plan.fail_after)
        for index, token in enumerate(plan.tokens):
            if index == plan.fail_after:
                raise ProviderStreamError("the offline model failed on purpose (/fail)")
            if plan.delay_s > 0:
                await trio.sleep(plan.delay_s)
            else:
                await trio.lowlevel.checkpoint()
            yield TextDelta(token)
        completion = len(plan.tokens)
        if plan.tool_call is not None:
            yield plan.tool_call
            completion += estimate_tokens([plan.tool_call.arguments])
        yield Usage(estimate_tokens(message_texts(request.messages)), completion)
        yield Finish("length" if cut else "tool_calls" if plan.tool_call else "stop", MODEL)


def plan_reply(request: ModelRequest, delay_s: float) -> _Plan:
    """Decides the whole reply up front, from the conversation alone, in time linear in
    ``planned_chars(request.messages)``."""
    messages = request.messages
    if messages and messages[-1].get("role") == "tool":
        return _Plan(tokenize(_answer_tool_results(messages)), delay_s)
    text = _last_user_text(messages).strip()
    trigger = _trigger_plan(text, delay_s)
    if trigger is not None:
        return trigger
    call = _tool_call(text, request, len(messages))
    if call is not None:
        return _Plan([], delay_s, tool_call=call)
    return _Plan(tokenize(compose_reply(text)), delay_s)


def planned_chars(messages: list[dict[str, Any]]) -> int:
    """How much text ``plan_reply`` reads: the last user message, or the whole conversation
    when it answers tool results (it looks up the calls they answer)."""
    if messages and messages[-1].get("role") == "tool":
        return sum(len(text) for text in message_texts(messages))
    return len(_last_user_text(messages))


def tokenize(text: str) -> list[str]:
    """Word pieces of at most six characters, each with the spaces before it."""
    # Trailing spaces belong to no piece: left in, a search would start at each of them and
    # read on to the end, quadratic in their number.
    return re.findall(r"\s*\S{1,6}", text.rstrip())


def compose_reply(text: str) -> str:
    """An echo of ``text`` and a few sentences built from its words, seeded by it."""
    if not text:
        return "Hello! I am the offline model. Ask me anything, or ask me to compute 12*7."
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    echo = " ".join(text.split())
    echo = echo if len(echo) <= 200 else echo[:197] + "..."
    words = [w.lower() for w in _WORD.findall(text) if len(w) <= _MAX_KEYWORD_CHARS]
    keywords = list(dict.fromkeys(w for w in words if w not in _STOPWORDS)) or ["this"]
    sentences = [f'You said: "{echo}".']
    chosen = rng.sample(keywords, min(2, len(keywords)))
    for index, template in enumerate(rng.sample(_THOUGHTS, 2)):
        keyword = chosen[index % len(chosen)]
        sentences.append(template.format(kw=keyword, Kw=keyword.capitalize()))
    sentences.append(rng.choice(_CLOSERS))
    return " ".join(sentences)


def _trigger_plan(text: str, delay_s: float) -> _Plan | None:
    if match := _TOKENS_TRIGGER.match(text):
        return _Plan(_lorem(_trigger_count(match.group(1))), delay_s)
    if re.match(r"/fail\b", text):
        tokens = tokenize("This reply breaks off on purpose, as asked.")
        return _Plan(tokens, delay_s, fail_after=FAIL_AFTER_TOKENS)
    if re.match(r"/slow\b", text):
        return _Plan(_lorem(SLOW_TOKENS), SLOW_DELAY_S)
    return None


def _trigger_count(digits: str) -> int:
    # int() of thousands of digits is slow, and refused above 4,300 of them.
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(MAX_TRIGGER_TOKENS)):
        return MAX_TRIGGER_TOKENS
    return min(int(digits), MAX_TRIGGER_TOKENS)


def _lorem(count: int) -> list[str]:
    return [("" if i == 0 else " ") + _LOREM[i % len(_LOREM)] for i in range(count)]


def _tool_call(text: str, request: ModelRequest, position: int) -> ToolCallRequest | None:
    offered = {tool.name for tool in request.tools}
    call_id = "call_" + hashlib.sha256(f"{position}:{text}".encode()).hexdigest()[:16]
    expression = find_expression(text)
    if expression is not None and "calculator" in offered:
        return ToolCallRequest(call_id, "calculator", json.dumps({"expression": expression}))
    if _TIME_QUESTION.search(text) and "current_time" in offered:
        zone = _ZONE.search(text)
        arguments = {"timezone": zone.group(1)} if zone else {}
        return ToolCallRequest(call_id, "current_time", json.dumps(arguments))
    return None


def find_expression(text: str) -> str | None:
    """The longest arithmetic expression in ``text`` (``^`` read as a power, runs of spaces
    read as one) that the calculator takes, or None; in time linear in ``len(text)``."""
    runs = sorted(_EXPRESSION_RUN.findall(" ".join(text.split())), key=len, reverse=True)
    for run in runs:
        expression = _balance(run.strip().rstrip(".").strip()).replace("^", "**")
        if len(expression) <= MAX_EXPRESSION_CHARS and _HAS_OPERATION.search(expression):
            return expression
    return None


def _balance(expression: str) -> str:
    """Drops parentheses left open or closed by the surrounding prose."""
    surplus = expression.count("(") - expression.count(")")
    if surplus > 0:
        return _drop_leading(expression, _OPEN_PAREN, surplus)
    if surplus < 0:
        return _drop_leading(expression[::-1], _CLOSE_PAREN, -surplus)[::-1]
    return expression


def _drop_leading(text: str, paren: re.Pattern[str], count: int) -> str:
    """``text`` without up to ``count`` leading parentheses and the spaces after each."""
    start = 0
    while count > 0 and (match := paren.match(text, start)):
        start, count = match.end(), count - 1
    return text[start:]


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def _answer_tool_results(messages: list[dict[str, Any]]) -> str:
    calls = _requested_calls(messages)
    answers = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        name, arguments = calls.get(message.get("tool_call_id", ""), ("tool", {}))
        answers.append(_describe_result(name, arguments, message.get("content")))
    return " ".join(reversed(answers))


def _requested_calls(messages: list[dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            function = call.get("function", {})
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except ValueError:
                arguments = {}
            if not isinstance(arguments, dict):
                arguments = {}
            calls[call.get("id", "")] = (function.get("name", "tool"), arguments)
    return calls


def _describe_result(name: str, arguments: Any, content: Any) -> str:
    try:
        result = json.loads(content) if isinstance(content, str) else content
    except ValueError:
        result = content
    if isinstance(result, dict) and result.get("error"):
        return f"I could not use {name}: {str(result['error'])[:500]}."
    if name == "calculator" and isinstance(result, int | float):
        return f"{arguments.get('expression', 'The result')} = {format_number(result)}."
    if name == "current_time" and isinstance(result, dict) and "iso" in result:
        moment = datetime.fromisoformat(result["iso"])
        zone = result.get("timezone", "UTC")
        return f"It is {moment:%H:%M} on {moment:%A %d %B %Y} ({zone})."
    return f"The {name} tool returned: {str(content)[:500]}."


def format_number(value: int | float) -> str:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return f"{value:.10g}" if isinstance(value, float) else str(value)
