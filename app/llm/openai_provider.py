"""The provider for any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, ...).

Every model call has two deadlines, counted from when ``stream()`` is entered: its first
streamed token (a content or tool-call delta; keep-alive comments and empty chunks are not
tokens) within ``model_first_token_timeout_s``, retries and their pauses included, and its
end within ``model_deadline_s``. They are cancel scopes at those times around the request
and around every read, so a server that keeps the connection busy with comments still ends
on time. ``request_timeout_s`` stays the HTTP client's limit on each connect and read: the
longest silence, which any byte (a comment too) ends. An expired limit raises
``ProviderTimeoutError`` naming it and its value.

Retries happen only before the first chunk, and here rather than in the ``openai`` client
(built with ``max_retries=0``), so that they keep to the deadlines: a refused request (408,
409, 429, 5xx, a timeout, a connection error) is sent again up to ``settings.max_retries``
times, after the pause the server asks for (``retry-after-ms``, ``Retry-After``) or else the
client's own back-off. A pause that would not end before the first-token deadline is not
taken: the call fails at once, stating the figures. Once a chunk has arrived nothing is
retried, because the text already streamed to users cannot be taken back.

Every ``openai``/``httpx2`` error is mapped once, here, to an ``app.llm.errors`` error (with
``raise ... from exc``); the API key never appears in their messages. ``trio.Cancelled``
always propagates; leaving ``stream()`` for any reason (a deadline too) closes the upstream
HTTP response, so a user's stop also closes the connection to the model server.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
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
#: The ``openai`` client's back-off between retries: 0.5 s doubling up to 8 s, less 0-25 %.
_INITIAL_RETRY_DELAY_S = 0.5
_MAX_RETRY_DELAY_S = 8.0
#: Statuses worth another attempt, as the ``openai`` client has them (every 5xx too).
_RETRY_STATUSES = frozenset({408, 409, 429})


@dataclass(slots=True)
class _Limits:
    """The limits of one model call, its start (trio time) and the requests it has sent."""

    first_token_s: float
    total_s: float
    idle_s: float
    started: float = field(default_factory=trio.current_time)
    attempts: int = 0

    @classmethod
    def of(cls, settings: Settings) -> _Limits:
        return cls(
            settings.model_first_token_timeout_s,
            settings.model_deadline_s,
            settings.request_timeout_s,
        )

    def _first_token_binds(self, first_token: bool) -> bool:
        return not first_token and self.first_token_s < self.total_s

    def deadline(self, first_token: bool) -> float:
        """When the call must have had its first token (``first_token`` False) or be over."""
        if self._first_token_binds(first_token):
            return self.started + self.first_token_s
        return self.started + self.total_s

    def left(self) -> float:
        """Seconds left before the first-token deadline (or the end, when sooner)."""
        return max(0.0, self.deadline(False) - trio.current_time())

    def name(self, first_token: bool) -> str:
        if self._first_token_binds(first_token):
            return f"the {_seconds(self.first_token_s)} first-token deadline"
        return f"the {_seconds(self.total_s)} deadline"

    def expired(self, first_token: bool) -> ProviderTimeoutError:
        if self._first_token_binds(first_token):
            return ProviderTimeoutError(
                f"no first token from the model within {_seconds(self.first_token_s)}"
                f" ({_attempts(self.attempts)})"
            )
        return ProviderTimeoutError(
            f"the model's reply exceeded the {_seconds(self.total_s)} deadline"
        )


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
            max_retries=0,  # retried by ``_open``, within the deadlines
            timeout=httpx2.Timeout(settings.request_timeout_s),
            http_client=http_client,
        )

    @property
    def default_model(self) -> str:
        return self._settings.model or DEFAULT_MODEL

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[StreamItem]]:
        """Opens the completion; raises ``LLMError`` if the server refuses it (after retries).

        Opening and iterating raise ``ProviderTimeoutError`` when the first token does not
        come within ``model_first_token_timeout_s`` or the call passes ``model_deadline_s``,
        or when no byte comes within ``request_timeout_s``; iterating raises
        ``ProviderStreamError`` when the connection breaks and ``ProviderProtocolError`` on a
        chunk that cannot be parsed. On exit (end, error, deadline or cancellation) the
        upstream response is closed, shielded, within a short timeout.
        """
        limits = _Limits.of(self._settings)
        model = request.model or self.default_model
        upstream = await self._open(_body(request, model), limits)
        reader = _ChunkReader(upstream, request, model, limits, self._redact)
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

    async def _open(self, body: dict[str, Any], limits: _Limits) -> httpx2.Response:
        """Sends the request, and again after a refusal while retries and time are left."""
        with trio.move_on_at(limits.deadline(False)):
            while True:
                limits.attempts += 1
                try:
                    return await self._post(body)
                except openai.OpenAIError as exc:
                    await self._pause_to_retry(exc, limits)
        raise limits.expired(False)

    async def _post(self, body: dict[str, Any]) -> httpx2.Response:
        # The body is sent as built: the client's ``create()`` would walk every message
        # through its type-driven transform (about a third of a busy server's CPU) to no
        # effect on plain text messages and tool specs. The answer comes back as the raw
        # streamed response (the client's timeouts, auth and error statuses still apply),
        # read by ``_sse_data``: the client's generic event-stream decoder and its per-chunk
        # processing cost a third of what a whole turn costs the server.
        return await self._client.post(
            "/chat/completions",
            body=body,
            options={"security": {"bearer_auth": True}},
            cast_to=httpx2.Response,
            stream=True,
        )

    async def _pause_to_retry(self, exc: openai.OpenAIError, limits: _Limits) -> None:
        """Sleeps before the next attempt, or raises the mapped error when there is none:
        no retry left, a final refusal, or a pause that would outlast the first-token
        deadline (then at once)."""
        if limits.attempts > self._settings.max_retries or not _retryable(exc):
            raise self._request_error(exc, limits.attempts) from exc
        asked = _retry_after(exc)
        pause = _backoff(limits.attempts) if asked is None else asked
        left = limits.left()
        if pause < left:
            await trio.sleep(pause)
            return
        beyond = f"the {_seconds(left, 1)} left of {limits.name(False)}"
        if isinstance(exc, openai.RateLimitError) and asked is not None:
            raise ProviderRateLimitedError(
                f"the model is rate limited: it asked to retry after {_seconds(asked)},"
                f" beyond {beyond}"
            ) from exc
        error = self._request_error(exc, limits.attempts)
        raise type(error)(
            f"{error}; a retry after {_seconds(pause)} would not fit in {beyond}"
        ) from exc

    def _request_error(self, exc: openai.OpenAIError, attempts: int = 1) -> LLMError:
        error = self._mapped(exc)
        return type(error)(f"{error} ({_attempts(attempts)})") if attempts > 1 else error

    def _mapped(self, exc: openai.OpenAIError) -> LLMError:
        timeout = _seconds(self._settings.request_timeout_s)
        if isinstance(exc, openai.APITimeoutError):
            return ProviderTimeoutError(f"the model server did not answer within {timeout}")
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


def _body(request: ModelRequest, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": request.messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        body["tools"] = [tool.to_openai() for tool in request.tools]
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    return body


def _retryable(exc: openai.OpenAIError) -> bool:
    """Whether the ``openai`` client would send the request again (``_should_retry``)."""
    if isinstance(exc, openai.APIStatusError):
        decided = exc.response.headers.get("x-should-retry")
        if decided in ("true", "false"):
            return decided == "true"
        return exc.status_code in _RETRY_STATUSES or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)  # timeouts included


def _retry_after(exc: openai.OpenAIError) -> float | None:
    """The pause the server asked for, in seconds: ``retry-after-ms``, else ``Retry-After``
    (seconds or an HTTP date); None when it asked for none that can be read."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, unit in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            value = float(headers.get(name, "nan")) * unit
        except ValueError:
            continue
        if not math.isnan(value):  # an overflow is infinite: too long to wait for
            return max(0.0, value)
    try:
        when = email.utils.parsedate_to_datetime(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _backoff(attempts: int) -> float:
    """The ``openai`` client's pause after ``attempts`` failed attempts, jitter included."""
    delay = min(_INITIAL_RETRY_DELAY_S * 2 ** (attempts - 1), _MAX_RETRY_DELAY_S)
    return delay * (1 - 0.25 * random.random())


def _seconds(value: float, digits: int = 2) -> str:
    return f"{round(value, digits):g} s"


def _attempts(count: int) -> str:
    return f"{count} attempt{'' if count == 1 else 's'}"


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
        limits: _Limits,
        redact: Callable[[str], str],
    ) -> None:
        self._chunks = _sse_data(upstream)
        self._request = request
        self._model = model
        self._limits = limits
        self._redact = redact
        #: Whether a content or tool-call delta has arrived (the first-token deadline is met).
        self._first_token = False
        self._pending: deque[StreamItem] = deque()
        self._tool_calls: dict[int, _ToolCallParts] = {}
        self._tool_calls_sent = False
        self._text: list[str] = []
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
        except _StreamedError as exc:
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
            f"the model server sent nothing for {_seconds(self._limits.idle_s)} {where}"
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
            self._first_token = True
            self._text.append(content)
            self._pending.append(TextDelta(content))
        for position, fragment in enumerate(delta.get("tool_calls") or ()):
            if not isinstance(fragment, dict):
                continue
            self._first_token = True
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
        arguments = [parts.arguments for parts in self._tool_calls.values()]
        return Usage(
            prompt_tokens=estimate_tokens(message_texts(self._request.messages)),
            completion_tokens=estimate_tokens([*self._text, *arguments]),
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
