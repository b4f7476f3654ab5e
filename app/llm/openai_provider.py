"""The provider for any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, ...).

Retries happen only before the first chunk: the ``openai`` client retries a refused request
(429, 5xx, connection errors) up to ``settings.max_retries`` times; once a chunk has arrived
nothing is retried, because the text already streamed to users cannot be taken back.

Every ``openai``/``httpx2`` error is mapped once, here, to an ``app.llm.errors`` error (with
``raise ... from exc``); the API key never appears in their messages. ``trio.Cancelled``
always propagates; leaving ``stream()`` for any reason closes the upstream HTTP response, so a
user's stop also closes the connection to the model server.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import httpx2
import openai
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
from app.llm.errors import (
    LLMError,
    ProviderProtocolError,
    ProviderRateLimitedError,
    ProviderRequestError,
    ProviderStreamError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
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
#: How long closing an abandoned stream may take, even under cancellation.
_CLOSE_TIMEOUT_S = 2.0
#: How long the end of a body may take to arrive after ``[DONE]`` (then it is closed).
_DRAIN_TIMEOUT_S = 0.1
_MAX_ERROR_TEXT = 300


class OpenAIProvider:
    """Streams chat completions from an OpenAI-compatible server.

    ``http_client`` (an ``httpx2.AsyncClient``) is handed to the ``openai`` client, which then
    owns it: ``aclose()`` closes it.
    """

    name = "openai"

    def __init__(self, settings: Settings, http_client: httpx2.AsyncClient | None = None) -> None:
        self._settings = settings
        self._secret = settings.openai_api_key or ""
        self._client = openai.AsyncOpenAI(
            # Local servers (llama.cpp, Ollama) need no key, but the client insists on one.
            api_key=settings.openai_api_key or "unused",
            base_url=settings.openai_base_url or DEFAULT_BASE_URL,
            max_retries=settings.max_retries,
            timeout=httpx2.Timeout(settings.request_timeout_s),
            http_client=http_client,
        )

    @property
    def default_model(self) -> str:
        return self._settings.model or DEFAULT_MODEL

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[StreamItem]]:
        """Opens the completion; raises ``LLMError`` if the server refuses it (after retries).

        Iterating raises ``ProviderTimeoutError`` when no chunk comes within
        ``request_timeout_s``, ``ProviderStreamError`` when the connection breaks and
        ``ProviderProtocolError`` on a chunk that cannot be parsed. On exit (end, error or
        cancellation) the upstream response is closed, shielded, within a short timeout.
        """
        model = request.model or self.default_model
        upstream = await self._open(request, model)
        reader = _ChunkReader(
            upstream, request, model, self._settings.request_timeout_s, self._redact
        )
        try:
            yield reader
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
                try:
                    await reader.aclose()
                    await upstream.aclose()
                except (httpx2.HTTPError, httpx2.StreamError):
                    pass  # The connection is being abandoned anyway.

    async def aclose(self) -> None:
        """Closes the ``openai`` client and its connection pool."""
        await self._client.close()

    async def _open(self, request: ModelRequest, model: str) -> httpx2.Response:
        # The body is sent as built: the client's ``create()`` would walk every message
        # through its type-driven transform (about a third of a busy server's CPU) to no
        # effect on plain text messages and tool specs. The answer comes back as the raw
        # streamed response (the client's retries, timeouts, auth and error statuses still
        # apply), read by ``_sse_data``: the client's generic event-stream decoder and its
        # per-chunk processing cost a third of what a whole turn costs the server.
        body: dict[str, Any] = {
            "model": model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = [tool.to_openai() for tool in request.tools]
        try:
            return await self._client.post(
                "/chat/completions",
                body=body,
                options={"security": {"bearer_auth": True}},
                cast_to=httpx2.Response,
                stream=True,
            )
        except openai.OpenAIError as exc:
            raise self._request_error(exc) from exc

    def _request_error(self, exc: openai.OpenAIError) -> LLMError:
        timeout = self._settings.request_timeout_s
        if isinstance(exc, openai.APITimeoutError):
            return ProviderTimeoutError(f"the model server did not answer within {timeout} s")
        if isinstance(exc, openai.APIConnectionError):
            url = self._client.base_url  # shown without any credentials it may carry
            where = f"{url.scheme}://{url.host}{f':{url.port}' if url.port else ''}{url.path}"
            return ProviderUnavailableError(f"cannot reach the model server at {where}")
        if isinstance(exc, openai.RateLimitError):
            return ProviderRateLimitedError(
                f"the model server is rate limiting us: {self._describe(exc)}"
            )
        if isinstance(exc, openai.APIStatusError):
            if exc.status_code >= 500:
                return ProviderUnavailableError(
                    f"the model server failed ({exc.status_code}): {self._describe(exc)}"
                )
            return ProviderRequestError(
                f"the model server refused the request ({exc.status_code}): {self._describe(exc)}"
            )
        return ProviderProtocolError(
            f"unexpected answer from the model server: {self._redact(str(exc))}"
        )

    def _describe(self, exc: openai.APIError) -> str:
        body = exc.body
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return self._redact(body["message"])
        return self._redact(exc.message)

    def _redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:_MAX_ERROR_TEXT]


@dataclass
class _ToolCallParts:
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


class _ChunkReader:
    """Turns ``chat.completion.chunk`` objects (parsed JSON) into ``StreamItem``s."""

    def __init__(
        self,
        upstream: httpx2.Response,
        request: ModelRequest,
        model: str,
        idle_timeout_s: float,
        redact: Callable[[str], str],
    ) -> None:
        self._chunks = _sse_data(upstream)
        self._request = request
        self._model = model
        self._idle_timeout_s = idle_timeout_s
        self._redact = redact
        self._pending: deque[StreamItem] = deque()
        self._tool_calls: dict[int, _ToolCallParts] = {}
        self._tool_calls_sent = False
        self._text_chars = 0
        self._usage: dict[str, Any] | None = None
        self._timings: dict[str, Any] = {}
        self._finish_reason: str | None = None
        self._done = False

    def __aiter__(self) -> _ChunkReader:
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
        except _StreamedError as exc:
            raise ProviderStreamError(
                f"the model server reported an error in mid-answer: {self._redact(str(exc))}"
            ) from exc
        except ValueError as exc:  # json.JSONDecodeError and friends
            raise ProviderProtocolError(
                f"the model server sent a chunk that is not valid JSON: {exc}"
            ) from exc

    def _stalled(self) -> ProviderTimeoutError:
        return ProviderTimeoutError(
            f"the model server sent nothing for {self._idle_timeout_s} s in mid-answer"
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
        self._timings.update(_server_timings(chunk))
        for choice in choices:
            self._absorb_choice(choice)

    def _absorb_choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        content = delta.get("content")
        if content and isinstance(content, str):
            self._text_chars += len(content)
            self._pending.append(TextDelta(content))
        for position, fragment in enumerate(delta.get("tool_calls") or ()):
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index")
            index = index if isinstance(index, int) else position
            self._tool_calls.setdefault(index, _ToolCallParts()).add(fragment)
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
        arguments = sum(len(parts.arguments) for parts in self._tool_calls.values())
        return Usage(
            prompt_tokens=estimate_tokens(message_texts(self._request.messages)),
            completion_tokens=max(1, math.ceil((self._text_chars + arguments) / 4)),
            estimated=True,
            server_timings=self._timings,
        )


class _StreamedError(Exception):
    """The server sent an error in place of a chunk."""


async def _sse_data(response: httpx2.Response) -> AsyncGenerator[Any, None]:
    """The parsed ``data`` of each server-sent event, up to ``[DONE]``.

    Events follow the event-stream format: ``field: value`` lines, several ``data`` lines
    joined by newlines, comments (``:``) skipped, a blank line ending each event. An event
    named ``error``, or data carrying an ``error`` object, raises ``_StreamedError`` (as the
    ``openai`` client does). After ``[DONE]`` the rest of the body is read briefly, as the
    client does, so that the connection goes back to the pool.
    """
    data: list[str] = []
    event = ""
    # ``aiter_lines`` is an async generator (typed as a plain iterator)
    async with aclosing(cast(AsyncGenerator[str, None], response.aiter_lines())) as lines:
        async for line in lines:
            if line:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
                continue
            if not data:
                event = ""
                continue
            text, name, data, event = "\n".join(data), event, [], ""
            if text.startswith("[DONE]"):
                with trio.move_on_after(_DRAIN_TIMEOUT_S):
                    async for _ in lines:
                        pass
                return
            parsed = json.loads(text)
            error = parsed.get("error") if isinstance(parsed, dict) else None
            if error or name == "error":
                message = error.get("message") if isinstance(error, dict) else None
                raise _StreamedError(message if isinstance(message, str) and message
                                     else "an error occurred during streaming")
            yield parsed


def _server_timings(chunk: dict[str, Any]) -> dict[str, Any]:
    return {key: chunk[key] for key in SERVER_TIMING_FIELDS if chunk.get(key) is not None}
