"""What a model provider is, as the actors see it.

A provider turns a ``ModelRequest`` into a stream of ``StreamItem``s. The stream is an async
context manager so that leaving it (normally, on error, or on cancellation by a stop) always
closes the upstream request:

    async with provider.stream(request) as items:
        async for item in items:
            ...

Items arrive in this order: any number of ``TextDelta`` and ``ToolCallRequest``, then one
``Usage``, then one ``Finish``. A provider raises only ``app.llm.errors.LLMError``s (and
``trio.Cancelled``); partial text already yielded stays valid.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as declared to the model: name, description, JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One call to the model.

    ``messages`` are OpenAI-style chat messages (``role``/``content``; assistant messages may
    carry ``tool_calls``; ``tool`` messages carry ``tool_call_id``).
    """

    messages: list[dict[str, Any]]
    model: str | None = None
    tools: tuple[ToolSpec, ...] = ()
    #: Most tokens the model may generate (``max_tokens``); None: the server's own limit. A
    #: reply cut by it finishes with reason ``length``.
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    #: Tokens this delta stands for (one streamed chunk is one token for OpenAI-style servers).
    tokens: int = 1


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """The model asks for a tool; ``arguments`` is the raw JSON text the model produced."""

    call_id: str
    name: str
    arguments: str


def assistant_tool_calls(calls: Iterable[ToolCallRequest]) -> dict[str, Any]:
    """The assistant message that asked for ``calls``, as it goes back to the model with the
    tools' results (OpenAI chat format)."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in calls
        ],
    }


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    #: True when the server reported no usage and these are our estimates.
    estimated: bool = False
    #: Server-side timings when the server sends them (llama.cpp ``timings``, Ollama durations).
    server_timings: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Finish:
    #: ``stop``, ``length``, ``tool_calls``, ``content_filter``...
    reason: str
    #: The model name the server says answered.
    model: str


StreamItem = TextDelta | ToolCallRequest | Usage | Finish


class Provider(Protocol):
    """A source of streamed model output."""

    #: ``openai`` or ``offline``.
    name: str

    @property
    def default_model(self) -> str: ...

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[StreamItem]]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Who a tool call runs for: tools that read data (``search_chats``) stay within ``owner``."""

    owner: str
    chat_id: str
    #: The call's id as the chat records it (None when a call is made outside a turn).
    call_id: str | None = None


#: Characters counted by class for ``estimate_tokens``: ASCII punctuation and digits, the
#: CJK scripts (kana, ideographs, hangul), and characters beyond the BMP (mostly emoji).
_PUNCTUATION = re.compile(r"[!-/:-@\[-`{-~0-9]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_ASTRAL = re.compile(r"[\U00010000-\U0010ffff]")


def estimate_tokens(texts: Iterable[str]) -> int:
    """Tokens a BPE tokenizer (OpenAI's, Llama's) would make of ``texts``, estimated: for
    servers that report no usage; 0 for no text.

    Characters are counted by class, each at the rate such tokenizers have for it: English
    words about 5 letters a token, punctuation and digits mostly one each, CJK characters
    about one each, other scripts (accented Latin words, Cyrillic, ...) about 2.6 characters
    a token, emoji 1.5 each. Measured against cl100k and o200k on English, French, German,
    Russian, Chinese, Japanese, code, numbers and emoji, it lands within about 15 % of one of
    them (four characters a token was off by a factor of 3 to 4 for Chinese and Japanese).
    Linear, with the counting done by the regular expression engine.
    """
    total = 0.0
    for text in texts:
        if not text:
            continue
        length = len(text)
        ascii_chars = len(text.encode("ascii", "ignore"))
        blanks = text.count(" ") + text.count("\n")
        punctuation = length - len(_PUNCTUATION.sub("", text))
        cjk = length - len(_CJK.sub("", text)) if ascii_chars < length else 0
        astral = length - len(_ASTRAL.sub("", text)) if ascii_chars < length else 0
        other = length - ascii_chars - cjk - astral
        letters = max(0, ascii_chars - blanks - punctuation)
        total += letters / 5.0 + punctuation * 0.7 + cjk * 0.9 + astral * 1.5 + other / 2.6
    return math.ceil(total)


def message_texts(messages: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The text of chat messages as the model reads it (content and tool calls)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif content is not None:
            yield json.dumps(content)
        for call in message.get("tool_calls") or ():
            yield json.dumps(call)
