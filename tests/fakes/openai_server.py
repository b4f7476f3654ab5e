"""A real OpenAI-compatible HTTP server on loopback, scripted per request, for trio tests.

It speaks plain HTTP/1.1 over trio sockets (keep-alive, chunked SSE bodies), so the code under
test uses its real HTTP client, retries, timeouts and connection handling::

    async with fake_openai_server(
        ErrorReply(500),                        # the first request fails ...
        StreamReply(["Hel", "lo"]),             # ... the retry streams "Hello"
    ) as server:
        settings = Settings(provider="openai", openai_base_url=server.base_url,
                            openai_api_key="test-key")
        ...
        assert len(server.requests) == 2        # parsed JSON bodies, in arrival order

Every ``POST /v1/chat/completions`` takes the next behaviour from the script (``server.script``
appends more). When the script is empty, ``default`` answers: a behaviour, or a function of the
request body that returns one; the built-in default, :func:`echo_reply`, streams
``You said: <last user message>``, so end-to-end tests and benchmarks need no script at all.
``GET /v1/models`` lists ``fake-model``. A request whose ``messages`` OpenAI would refuse
(``messages_problem``: an unknown role, a tool result that answers no call, a call left
unanswered...) gets a 400 error and is not counted in ``requests``.

Behaviours:

``StreamReply``  streams ``pieces`` (one SSE ``chat.completion.chunk`` each, the first one
                 carrying ``role``), then ``tool_calls`` split into fragments the way OpenAI
                 sends them, then a chunk with ``finish_reason`` (and llama.cpp ``timings`` or
                 any ``extra`` fields), then, when the request asked for
                 ``stream_options.include_usage``, a usage chunk with ``choices: []``, then
                 ``data: [DONE]``. Faults: ``delay_s`` between chunks, ``drop_after`` N chunks
                 (the connection is closed mid-body), ``malformed_after`` N chunks (sends
                 ``data: {not json``), ``error_after`` N chunks (sends an in-stream
                 ``{"error": ...}`` event), ``stall_after`` N chunks for ``stall_s`` seconds
                 (``stall_after=0``: before the first chunk, the headers sent), ``usage=False``
                 (no usage chunk), ``headers_delay_s`` before the status line, and
                 ``keepalive_s``: an SSE comment (``: keep-alive``) every so many seconds
                 through every stall and ``delay_s`` pause, as proxies and some servers send
                 to keep an idle stream open. A request with ``"stream": false`` gets one
                 ``chat.completion`` instead (after ``headers_delay_s``).
``ErrorReply``   answers ``status`` with an OpenAI-style JSON error body, after ``delay_s``,
                 with ``Retry-After: <retry_after>`` (0 by default) and ``retry-after-ms:
                 <retry_after_ms>`` (1 by default, so client retries do not sleep for long;
                 clients read it first). None leaves either header out.
``HangUp``       closes the connection without answering.

``server.client_disconnected`` (a ``trio.Event``) is set when the client closes its connection
before an answer is complete, whether the server was writing, sleeping (a headers delay, a
stall) or sending keep-alive comments at the time; ``server.disconnects`` counts such closes.
The server stops when the ``async with`` block ends.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

MODEL = "fake-model"
_MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call to stream; ``arguments`` (JSON text, or a dict to encode) is sent in
    fragments of ``fragment_chars`` characters after a first fragment with id and name."""

    name: str
    arguments: str | dict[str, Any] = "{}"
    call_id: str | None = None
    fragment_chars: int = 7

    @property
    def arguments_json(self) -> str:
        args = self.arguments
        return args if isinstance(args, str) else json.dumps(args)


@dataclass(frozen=True)
class StreamReply:
    """Streams an answer; see the module docstring. Chunk counts (``drop_after``,
    ``malformed_after``, ``stall_after``) count content pieces and tool-call fragments."""

    pieces: Sequence[str] = ()
    tool_calls: Sequence[FakeToolCall] = ()
    #: Defaults to ``tool_calls`` when there are tool calls, else ``stop``.
    finish_reason: str | None = None
    #: True: computed usage; a dict: sent as is; False: no usage chunk.
    usage: bool | dict[str, Any] = True
    #: llama.cpp-style ``timings``, added to the chunk carrying ``finish_reason``.
    timings: dict[str, Any] | None = None
    #: Other fields merged into that chunk (for example Ollama's ``eval_count``).
    extra: dict[str, Any] | None = None
    model: str = MODEL
    delay_s: float = 0.0
    drop_after: int | None = None
    malformed_after: int | None = None
    #: Sends ``data: {"error": {...}}`` after N chunks, as servers do when failing mid-answer.
    error_after: int | None = None
    stall_after: int | None = None
    stall_s: float = 3600.0
    headers_delay_s: float = 0.0
    #: Seconds between keep-alive comments while stalled or pausing (0: none).
    keepalive_s: float = 0.0


@dataclass(frozen=True)
class ErrorReply:
    """Answers ``status`` with ``{"error": {"message", "type", "code"}}``."""

    status: int = 500
    message: str = "the fake server failed on purpose"
    #: ``Retry-After``: seconds, or text sent as is (an HTTP date); None leaves it out.
    retry_after: float | str | None = 0
    #: ``retry-after-ms``, which clients read first; None leaves it out.
    retry_after_ms: int | None = 1
    delay_s: float = 0.0

    def headers(self) -> dict[str, str]:
        headers = {}
        if isinstance(self.retry_after, str):
            headers["retry-after"] = self.retry_after
        elif self.retry_after is not None:
            headers["retry-after"] = f"{self.retry_after:g}"
        if self.retry_after_ms is not None:
            headers["retry-after-ms"] = str(self.retry_after_ms)
        return headers


@dataclass(frozen=True)
class HangUp:
    """Closes the connection without an answer (a crashed or unreachable upstream)."""


Behaviour = StreamReply | ErrorReply | HangUp
Default = Behaviour | Callable[[dict[str, Any]], Behaviour]


def echo_reply(body: dict[str, Any]) -> StreamReply:
    """Streams ``You said: <last user message>`` word by word."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    text = _text_of(users[-1]) if users else ""
    words = f"You said: {text}".split(" ")
    return StreamReply([words[0], *(f" {w}" for w in words[1:])])


@dataclass
class FakeOpenAIServer:
    base_url: str
    default: Default = echo_reply
    #: Parsed JSON bodies of the chat completion requests received, in arrival order.
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: Their headers (lower-cased names), in the same order.
    request_headers: list[dict[str, str]] = field(default_factory=list)
    client_disconnected: trio.Event = field(default_factory=trio.Event)
    disconnects: int = 0
    _queue: deque[Behaviour] = field(default_factory=deque)

    def script(self, *behaviours: Behaviour) -> None:
        """Queues behaviours for the next requests, in order."""
        self._queue.extend(behaviours)

    def next_behaviour(self, body: dict[str, Any]) -> Behaviour:
        if self._queue:
            return self._queue.popleft()
        return self.default(body) if callable(self.default) else self.default

    def note_disconnect(self) -> None:
        self.disconnects += 1
        self.client_disconnected.set()


@asynccontextmanager
async def fake_openai_server(
    *behaviours: Behaviour, default: Default = echo_reply
) -> AsyncIterator[FakeOpenAIServer]:
    """Serves on 127.0.0.1 (a free port) until the block ends; yields the server."""
    async with trio.open_nursery() as nursery:
        server: FakeOpenAIServer | None = None

        async def handle(stream: trio.SocketStream) -> None:
            assert server is not None
            await _Connection(stream, server).serve()

        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        server = FakeOpenAIServer(base_url=f"http://127.0.0.1:{port}/v1", default=default)
        server.script(*behaviours)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


class _Connection:
    """One client connection: requests one after the other (keep-alive)."""

    def __init__(self, stream: trio.SocketStream, server: FakeOpenAIServer) -> None:
        self._stream = stream
        self._server = server
        self._buffer = bytearray()

    async def serve(self) -> None:
        async with self._stream:
            try:
                while (request := await self._read_request()) is not None:
                    if not await self._answer(*request):
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _read_request(self) -> tuple[str, str, dict[str, str], bytes] | None:
        while b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > _MAX_HEADER_BYTES or not await self._fill():
                return None
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            method, path, _version = lines[0].split(" ", 2)
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return None  # not HTTP: hang up
        while len(self._buffer) < length:
            if not await self._fill():
                return None
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return method, path, headers, body

    async def _fill(self) -> bool:
        data = await self._stream.receive_some(65536)
        self._buffer.extend(data)
        return bool(data)

    async def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bool:
        """Answers one request; returns whether the connection stays open."""
        path = path.split("?", 1)[0]
        if method == "GET" and path.endswith("/models"):
            models = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
            await self._send_json(200, models)
            return True
        if method != "POST" or not path.endswith("/chat/completions"):
            await self._send_json(404, _error_body(f"no route for {method} {path}", 404))
            return True
        try:
            request = json.loads(body)
        except ValueError:
            await self._send_json(400, _error_body("the body is not JSON", 400))
            return True
        problem = messages_problem(request["messages"]) if "messages" in request else None
        if problem is not None:  # as OpenAI answers a malformed conversation
            await self._send_json(400, _error_body(problem, 400))
            return True
        self._server.requests.append(request)
        self._server.request_headers.append(headers)
        behaviour = self._server.next_behaviour(request)
        if isinstance(behaviour, HangUp):
            return False
        if isinstance(behaviour, ErrorReply):
            return await self._watched(partial(self._send_error, behaviour))
        if not request.get("stream"):
            return await self._watched(partial(self._send_completion, behaviour, request))
        return await self._watched(partial(self._send_stream, behaviour, request))

    async def _watched(self, send: Callable[[], Awaitable[bool | None]]) -> bool:
        """Answers with ``send`` while watching for the client to hang up; False if the
        connection ended (``send`` returns None to have it dropped here)."""
        finished: bool | None = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                try:
                    if await self._fill():  # a well-behaved client sends nothing meanwhile
                        await trio.sleep_forever()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                self._server.note_disconnect()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                finished = await send()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._server.note_disconnect()
            nursery.cancel_scope.cancel()
        if finished is None:
            return await self._drop()
        return finished

    async def _drop(self) -> bool:
        """Closes the connection in mid-body (the watcher is gone by then)."""
        await self._stream.aclose()
        return False

    async def _send_error(self, reply: ErrorReply) -> bool:
        await trio.sleep(reply.delay_s)
        error = _error_body(reply.message, reply.status)
        await self._send_json(reply.status, error, reply.headers())
        return True

    async def _send_completion(self, reply: StreamReply, request: dict[str, Any]) -> bool:
        await trio.sleep(reply.headers_delay_s)
        await self._send_json(200, _completion(reply, request))
        return True

    async def _send_stream(self, reply: StreamReply, request: dict[str, Any]) -> bool | None:
        """Sends the stream; True when complete, None when it must be dropped here."""
        await trio.sleep(reply.headers_delay_s)
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            "transfer-encoding: chunked\r\n\r\n"
        )
        await self._stream.send_all(head.encode())
        chunks = _chunks(reply, request)
        for sent, chunk in enumerate(chunks):
            if sent == reply.drop_after:
                return None
            if sent == reply.malformed_after:
                await self._send_chunk(b"data: {not json\n\n")
            if sent == reply.error_after:
                error = _error_body("the fake server failed in mid-answer", 500)
                await self._send_chunk(b"data: " + json.dumps(error).encode() + b"\n\n")
            if sent == reply.stall_after:
                await self._pause(reply.stall_s, reply.keepalive_s)
            if sent and reply.delay_s:
                await self._pause(reply.delay_s, reply.keepalive_s)
            await self._send_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        # [DONE] and the end of the body in one write, so the client never sees one alone.
        await self._stream.send_all(_chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        return True

    async def _pause(self, seconds: float, keepalive_s: float) -> None:
        """Sleeps, sending a keep-alive comment every ``keepalive_s`` seconds (if not 0)."""
        end = trio.current_time() + seconds
        while keepalive_s and trio.current_time() + keepalive_s < end:
            await trio.sleep(keepalive_s)
            await self._send_chunk(b": keep-alive\n\n")
        await trio.sleep_until(end)

    async def _send_chunk(self, data: bytes) -> None:
        await self._stream.send_all(_chunked(data))

    async def _send_json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(body).encode()
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += ["content-type: application/json", f"content-length: {len(payload)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        await self._stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def messages_problem(messages: Any) -> str | None:
    """What OpenAI's chat API would refuse in ``messages`` (None: nothing): each message has
    a known role; content is text (or parts), and may be null only for an assistant message
    with ``tool_calls``; each tool call has an id, ``type: function`` and a function name
    with JSON-text arguments; each ``tool`` message answers a call of the assistant message
    before it, and every such call is answered before the next other message."""
    if not isinstance(messages, list) or not messages:
        return "messages: a non-empty array is required"
    waiting: set[str] = set()
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            return f"messages[{i}].role: {role!r} is not a role"
        if role != "tool" and waiting:
            return f"messages[{i}]: tool calls {sorted(waiting)} have no tool message"
        content = m.get("content")
        if not isinstance(content, str | list) and not (
                role == "assistant" and content is None and m.get("tool_calls")):
            return f"messages[{i}].content: text is required"
        if role == "assistant" and "tool_calls" in m:
            for call in m["tool_calls"]:
                function = call.get("function") or {}
                if (call.get("type") != "function" or not isinstance(call.get("id"), str)
                        or not isinstance(function.get("name"), str)):
                    return f"messages[{i}].tool_calls: malformed call {call!r}"
                arguments = function.get("arguments")
                try:
                    json.loads(arguments if isinstance(arguments, str) else "")
                except ValueError:
                    return f"messages[{i}].tool_calls: arguments must be JSON text"
                waiting.add(call["id"])
        if role == "tool":
            if m.get("tool_call_id") not in waiting:
                return f"messages[{i}].tool_call_id: answers no pending tool call"
            waiting.discard(m["tool_call_id"])
    return None


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _error_body(message: str, status: int) -> dict[str, Any]:
    kind = (
        "rate_limit_exceeded"
        if status == 429
        else "server_error"
        if status >= 500
        else ("invalid_request_error")
    )
    return {"error": {"message": message, "type": kind, "code": kind, "param": None}}


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _usage(reply: StreamReply, request: dict[str, Any], completion: int) -> dict[str, Any]:
    if isinstance(reply.usage, dict):
        return reply.usage
    chars = sum(len(_text_of(m)) for m in request.get("messages", []))
    prompt = max(1, math.ceil(chars / 4))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _tool_fragments(reply: StreamReply) -> list[dict[str, Any]]:
    fragments: list[dict[str, Any]] = []
    for index, call in enumerate(reply.tool_calls):
        call_id = call.call_id or f"call_fake_{index}"
        fragments.append(
            {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
        )
        text, size = call.arguments_json, max(1, call.fragment_chars)
        for start in range(0, len(text), size):
            fragments.append(
                {"index": index, "function": {"arguments": text[start : start + size]}}
            )
    return fragments


def _chunks(reply: StreamReply, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ``data:`` payload of the stream, in order (without ``[DONE]``)."""
    deltas: list[dict[str, Any]] = [{"content": piece} for piece in reply.pieces]
    deltas += [{"tool_calls": [fragment]} for fragment in _tool_fragments(reply)]
    if deltas:
        deltas[0] = {"role": "assistant", **deltas[0]}
    chunks = [_chunk(reply, [_choice(delta, None)]) for delta in deltas]
    reason = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
    last = _chunk(reply, [_choice({}, reason)])
    if reply.timings is not None:
        last["timings"] = reply.timings
    last.update(reply.extra or {})
    chunks.append(last)
    wants_usage = (request.get("stream_options") or {}).get("include_usage")
    if wants_usage and reply.usage is not False:
        usage_chunk = _chunk(reply, [])
        usage_chunk["usage"] = _usage(reply, request, len(deltas))
        chunks.append(usage_chunk)
    return chunks


def _chunk(reply: StreamReply, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": reply.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": None,
    }


def _choice(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _completion(reply: StreamReply, request: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.pieces)}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.call_id or f"call_fake_{index}",
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json},
            }
            for index, call in enumerate(reply.tool_calls)
        ]
    reason = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
    completion = len(reply.pieces) + len(reply.tool_calls)
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": reply.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
        "usage": _usage(reply, request, completion),
    }
    if reply.timings is not None:
        body["timings"] = reply.timings
    body.update(reply.extra or {})
    return body
