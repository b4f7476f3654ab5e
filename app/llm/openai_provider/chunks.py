"""Streamed ``chat.completion.chunk`` objects (parsed JSON) turned into ``StreamItem``s:
text deltas at once, tool calls once their fragments are complete, then the usage (the
server's, or estimated) and the finish."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import trio

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
from app.llm.errors import ProviderProtocolError, ProviderStreamError, ProviderTimeoutError

from .limits import Limits, seconds
from .sse import StreamedError, sse_data

#: Chunk fields kept as server timings: llama.cpp's ``timings`` and Ollama's durations.
SERVER_TIMING_FIELDS = (
    "timings",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@dataclass
class ToolCallParts:
    call_id: str = ""
    name: str = ""
    arguments: str = ""

    def add(self, fragment: dict[str, Any]) -> None:
        if fragment.get("id"):
            self.call_id = self.call_id or fragment["id"]
        function = fragment.get("function")
        if not isinstance(function, dict):
            return
        # Some servers repeat the whole name in every fragment; OpenAI sends it once.
        name = function.get("name")
        if name and name != self.name:
            self.name += name
        self.arguments += function.get("arguments") or ""


class ChunkReader:
    """Turns ``chat.completion.chunk`` objects (parsed JSON) into ``StreamItem``s."""

    def __init__(
        self,
        upstream: httpx2.Response,
        request: ModelRequest,
        model: str,
        limits: Limits,
        redact: Callable[[str], str],
    ) -> None:
        self._chunks = sse_data(upstream)
        self._request = request
        self._model = model
        self._limits = limits
        self._redact = redact
        #: Whether a content or tool-call delta has arrived (the first-token deadline is met).
        self._first_token = False
        self._pending: deque[StreamItem] = deque()
        self._tool_calls: dict[int, ToolCallParts] = {}
        self._tool_calls_sent = False
        self._text: list[str] = []
        self._usage: dict[str, Any] | None = None
        self._timings: dict[str, Any] = {}
        self._finish_reason: str | None = None
        self._done = False

    def __aiter__(self) -> ChunkReader:
        return self

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __anext__(self) -> StreamItem:
        while not self._pending:
            if self._done:
                raise StopAsyncIteration
            chunk = await self._next_chunk()
            if chunk is None:
                self._end()
            else:
                self._absorb(chunk)
        return self._pending.popleft()

    async def _next_chunk(self) -> Any:
        # Bytes that are no chunk (keep-alive comments) end the HTTP client's read timeout,
        # not this scope: its deadline is the call's, the same for every read.
        with trio.move_on_at(self._limits.deadline(self._first_token)):
            return await self._read_chunk()
        raise self._limits.expired(self._first_token)

    async def _read_chunk(self) -> Any:
        # A silence between chunks ends as the HTTP client's read timeout (the client's
        # ``timeout`` is ``request_timeout_s`` for every read), not as a cancel scope per chunk.
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        except httpx2.TimeoutException as exc:
            raise self._stalled() from exc
        except (httpx2.HTTPError, httpx2.StreamError) as exc:
            raise ProviderStreamError(
                "the connection to the model server broke in mid-answer"
            ) from exc
        except StreamedError as exc:
            raise ProviderStreamError(
                f"the model server reported an error in mid-answer: {self._redact(str(exc))}"
            ) from exc
        except ValueError as exc:  # json.JSONDecodeError and friends
            raise ProviderProtocolError(
                f"the model server sent a chunk that is not valid JSON: {exc}"
            ) from exc

    def _stalled(self) -> ProviderTimeoutError:
        where = "in mid-answer" if self._first_token else "before its first token"
        return ProviderTimeoutError(
            f"the model server sent nothing for {seconds(self._limits.idle_s)} {where}"
        )

    def _absorb(self, chunk: Any) -> None:
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise ProviderProtocolError(
                f"the model server sent an unexpected chunk: {chunk!r:.200}"
            )
        self._model = chunk.get("model") or self._model
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        self._timings.update(server_timings(chunk))
        for choice in choices:
            self._absorb_choice(choice)

    def _absorb_choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        content = delta.get("content")
        if content and isinstance(content, str):
            self._first_token = True
            self._text.append(content)
            self._pending.append(TextDelta(content))
        for position, fragment in enumerate(delta.get("tool_calls") or ()):
            if not isinstance(fragment, dict):
                continue
            self._first_token = True
            index = fragment.get("index")
            index = index if isinstance(index, int) else position
            self._tool_calls.setdefault(index, ToolCallParts()).add(fragment)
        if choice.get("finish_reason"):
            self._finish_reason = choice["finish_reason"]
            self._flush_tool_calls()

    def _flush_tool_calls(self) -> None:
        if self._tool_calls_sent:
            return
        self._tool_calls_sent = True
        for index, parts in sorted(self._tool_calls.items()):
            call_id = parts.call_id or f"call_{index}"
            self._pending.append(ToolCallRequest(call_id, parts.name, parts.arguments or "{}"))

    def _end(self) -> None:
        self._done = True
        self._flush_tool_calls()
        self._pending.append(self._final_usage())
        reason = self._finish_reason or ("tool_calls" if self._tool_calls else "stop")
        self._pending.append(Finish(reason, self._model))

    def _final_usage(self) -> Usage:
        usage = self._usage
        if usage is not None and isinstance(usage.get("prompt_tokens"), int):
            return Usage(
                usage["prompt_tokens"], usage.get("completion_tokens") or 0,
                server_timings=self._timings,
            )
        arguments = [parts.arguments for parts in self._tool_calls.values()]
        return Usage(
            prompt_tokens=estimate_tokens(message_texts(self._request.messages)),
            completion_tokens=estimate_tokens([*self._text, *arguments]),
            estimated=True,
            server_timings=self._timings,
        )


def server_timings(chunk: dict[str, Any]) -> dict[str, Any]:
    return {key: chunk[key] for key in SERVER_TIMING_FIELDS if chunk.get(key) is not None}
