"""The OpenAI-compatible provider against a real HTTP server on loopback."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
import trio

from app.config import Settings
from app.llm import build_provider
from app.llm.base import (
    Finish,
    ModelRequest,
    StreamItem,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
    Usage,
    estimate_tokens,
)
from app.llm.errors import (
    ProviderProtocolError,
    ProviderRateLimitedError,
    ProviderRequestError,
    ProviderStreamError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from app.llm.openai_provider import OpenAIProvider
from app.llm.openai_provider.sse import StreamedError, sse_data
from tests.fakes.openai_server import (
    ErrorReply,
    FakeOpenAIServer,
    FakeToolCall,
    HangUp,
    StreamReply,
    fake_openai_server,
)

KEY = "sk-test-0123456789abcdef"
HELLO = ModelRequest([{"role": "user", "content": "Say hello to the world"}])
CALCULATOR = ToolSpec(
    "calculator",
    "Evaluates arithmetic.",
    {"type": "object", "properties": {"expression": {"type": "string"}}},
)


def settings_for(base_url: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "provider": "openai",
        "openai_base_url": base_url,
        "openai_api_key": KEY,
        "request_timeout_s": 2.0,
        "max_retries": 2,
    }
    return Settings(**(values | changes))


@asynccontextmanager
async def provider_for(server: FakeOpenAIServer, **changes: Any) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(settings_for(server.base_url, **changes))
    try:
        yield provider
    finally:
        await provider.aclose()


async def collect(
    provider: OpenAIProvider, request: ModelRequest = HELLO, into: list[StreamItem] | None = None
) -> list[StreamItem]:
    items = [] if into is None else into
    with trio.fail_after(10):
        async with provider.stream(request) as stream:
            async for item in stream:
                items.append(item)
    return items


def texts(items: list[StreamItem]) -> list[str]:
    return [item.text for item in items if isinstance(item, TextDelta)]


def only(items: list[StreamItem], kind: type) -> Any:
    (found,) = [item for item in items if isinstance(item, kind)]
    return found


async def test_streams_text_then_usage_then_finish() -> None:
    async with fake_openai_server(StreamReply(["Hel", "lo", " world"])) as server:
        async with provider_for(server) as provider:
            items = await collect(provider)

    assert texts(items) == ["Hel", "lo", " world"]
    assert isinstance(items[-2], Usage) and isinstance(items[-1], Finish)
    usage = items[-2]
    assert (usage.prompt_tokens, usage.completion_tokens) == (6, 3)  # as the server reported
    assert usage.estimated is False
    assert items[-1] == Finish("stop", "fake-model")
    sent = server.requests[0]
    assert sent["model"] == "gpt-4o-mini"
    assert sent["messages"] == HELLO.messages
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert "tools" not in sent
    assert server.request_headers[0]["authorization"] == f"Bearer {KEY}"


async def test_model_comes_from_the_request_then_the_settings() -> None:
    async with fake_openai_server(StreamReply(["a"]), StreamReply(["b"])) as server:
        async with provider_for(server, model="local-llama") as provider:
            assert provider.default_model == "local-llama"
            await collect(provider)
            await collect(provider, ModelRequest(HELLO.messages, model="other"))

    assert [request["model"] for request in server.requests] == ["local-llama", "other"]


async def test_tool_call_fragments_are_assembled() -> None:
    calls = [
        FakeToolCall("calculator", {"expression": "12*7"}, call_id="call_a", fragment_chars=3),
        FakeToolCall("current_time", {"timezone": "Europe/Paris"}, call_id="call_b"),
    ]
    request = ModelRequest(HELLO.messages, tools=(CALCULATOR,))
    async with fake_openai_server(StreamReply(tool_calls=calls)) as server:
        async with provider_for(server) as provider:
            items = await collect(provider, request)

    requested = [item for item in items if isinstance(item, ToolCallRequest)]
    assert requested == [
        ToolCallRequest("call_a", "calculator", '{"expression": "12*7"}'),
        ToolCallRequest("call_b", "current_time", '{"timezone": "Europe/Paris"}'),
    ]
    assert texts(items) == []
    assert items[-1].reason == "tool_calls"  # type: ignore[union-attr]
    assert server.requests[0]["tools"] == [CALCULATOR.to_openai()]


@pytest.mark.parametrize("status", [500, 429])
async def test_a_refused_request_is_retried_before_the_first_token(status: int) -> None:
    async with fake_openai_server(ErrorReply(status), StreamReply(["once"])) as server:
        async with provider_for(server) as provider:
            items = await collect(provider)

    assert len(server.requests) == 2
    assert texts(items) == ["once"]


async def test_repeated_server_errors_end_as_unavailable() -> None:
    async with fake_openai_server(*[ErrorReply(500, "overloaded")] * 3) as server:
        async with provider_for(server, max_retries=2) as provider:
            with pytest.raises(ProviderUnavailableError, match="500") as caught:
                await collect(provider)

    assert len(server.requests) == 3
    assert KEY not in str(caught.value)


async def test_repeated_rate_limits_end_as_rate_limited() -> None:
    async with fake_openai_server(*[ErrorReply(429, "slow down")] * 2) as server:
        async with provider_for(server, max_retries=1) as provider:
            with pytest.raises(ProviderRateLimitedError, match="slow down"):
                await collect(provider)


async def test_a_refused_key_is_a_request_error_that_never_shows_the_key() -> None:
    message = f"Incorrect API key provided: {KEY}"
    async with fake_openai_server(ErrorReply(401, message)) as server:
        async with provider_for(server) as provider:
            with pytest.raises(ProviderRequestError, match="401") as caught:
                await collect(provider)

    assert len(server.requests) == 1  # a 4xx is not retried
    assert KEY not in str(caught.value)


async def test_an_unreachable_server_is_unavailable() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = OpenAIProvider(settings_for(f"http://127.0.0.1:{port}/v1", max_retries=0))
    try:
        with pytest.raises(ProviderUnavailableError, match="cannot reach"):
            await collect(provider)
    finally:
        await provider.aclose()


async def test_a_hang_up_before_answering_is_retried() -> None:
    async with fake_openai_server(HangUp(), StreamReply(["back"])) as server:
        async with provider_for(server) as provider:
            items = await collect(provider)

    assert texts(items) == ["back"]
    assert len(server.requests) == 2


async def test_a_connection_dropped_mid_stream_is_a_stream_error_after_the_partial_text() -> None:
    items: list[StreamItem] = []
    async with fake_openai_server(StreamReply(["a", "b", "c", "d"], drop_after=2)) as server:
        async with provider_for(server) as provider:
            with pytest.raises(ProviderStreamError):
                await collect(provider, into=items)

    assert texts(items) == ["a", "b"]
    assert len(server.requests) == 1  # never retried once text has arrived


async def test_a_malformed_chunk_is_a_protocol_error() -> None:
    items: list[StreamItem] = []
    async with fake_openai_server(StreamReply(["a", "b"], malformed_after=1)) as server:
        async with provider_for(server) as provider:
            with pytest.raises(ProviderProtocolError, match="not valid JSON"):
                await collect(provider, into=items)

    assert texts(items) == ["a"]


async def test_a_stall_between_chunks_times_out() -> None:
    items: list[StreamItem] = []
    async with fake_openai_server(StreamReply(["a", "b"], stall_after=1, stall_s=30)) as server:
        async with provider_for(server, request_timeout_s=0.3) as provider:
            started = trio.current_time()
            with pytest.raises(ProviderTimeoutError):
                await collect(provider, into=items)
            elapsed = trio.current_time() - started
            with trio.fail_after(2):
                await server.client_disconnected.wait()  # the stalled request was closed

    assert texts(items) == ["a"]
    assert 0.3 <= elapsed < 1.5


async def test_missing_usage_is_estimated_and_marked_so() -> None:
    async with fake_openai_server(StreamReply(["Hello", " there", ", friend"], usage=False)) as s:
        async with provider_for(s) as provider:
            items = await collect(provider)

    usage = only(items, Usage)
    assert usage.estimated is True
    assert usage.completion_tokens == estimate_tokens(["Hello there, friend"]) == 4
    assert usage.prompt_tokens == estimate_tokens(["Say hello to the world"])


async def test_server_timings_are_kept() -> None:
    timings = {"prompt_n": 6, "prompt_ms": 12.5, "predicted_n": 2, "predicted_per_second": 80.0}
    ollama = {"eval_count": 2, "eval_duration": 25_000_000, "total_duration": 40_000_000}
    reply = StreamReply(["hi", "!"], timings=timings, extra=ollama)
    async with fake_openai_server(reply) as server:
        async with provider_for(server) as provider:
            items = await collect(provider)

    usage = only(items, Usage)
    assert usage.server_timings == {"timings": timings, **ollama}
    assert usage.estimated is False
    assert json.loads(json.dumps(usage.server_timings))["timings"] == timings  # storable


async def test_a_stop_mid_stream_closes_the_upstream_connection() -> None:
    reply = StreamReply([f" t{i}" for i in range(200)], delay_s=0.02)
    received: list[StreamItem] = []
    async with fake_openai_server(reply) as server:
        async with provider_for(server) as provider:
            with trio.fail_after(10):
                with trio.CancelScope() as stop:
                    async with provider.stream(HELLO) as stream:
                        async for item in stream:
                            received.append(item)
                            if len(received) == 3:
                                stop.cancel()
                assert stop.cancelled_caught
            with trio.fail_after(2):
                await server.client_disconnected.wait()

    assert texts(received) == [" t0", " t1", " t2"]
    assert server.disconnects == 1


async def test_build_provider_picks_openai_from_the_settings() -> None:
    async with fake_openai_server() as server:
        provider = build_provider(settings_for(server.base_url))
        try:
            assert provider.name == "openai"
            items = await collect(provider, HELLO)  # type: ignore[arg-type]
        finally:
            await provider.aclose()

    assert "".join(texts(items)) == "You said: Say hello to the world"


async def test_leaving_the_stream_early_closes_the_upstream_connection() -> None:
    reply = StreamReply([f" t{i}" for i in range(200)], delay_s=0.02)
    async with fake_openai_server(reply) as server:
        async with provider_for(server) as provider:
            with trio.fail_after(10):
                async with provider.stream(HELLO) as stream:
                    async for item in stream:
                        assert isinstance(item, TextDelta)
                        break
                await server.client_disconnected.wait()

    assert server.disconnects == 1


async def test_an_error_event_mid_stream_is_a_stream_error() -> None:
    items: list[StreamItem] = []
    async with fake_openai_server(StreamReply(["a", "b"], error_after=1)) as server:
        async with provider_for(server) as provider:
            with pytest.raises(ProviderStreamError, match="failed in mid-answer"):
                await collect(provider, into=items)

    assert texts(items) == ["a"]


async def test_no_answer_at_all_times_out() -> None:
    async with fake_openai_server(StreamReply(["late"], headers_delay_s=30)) as server:
        async with provider_for(server, request_timeout_s=0.3, max_retries=0) as provider:
            with pytest.raises(ProviderTimeoutError, match="did not answer within 0.3 s"):
                await collect(provider)


async def sse(body: bytes) -> list[Any]:
    """What the provider reads of an event-stream body."""
    return [data async for data in sse_data(httpx2.Response(200, content=body))]


async def test_event_stream_reading_follows_the_format() -> None:
    body = (b": a comment\n\n"
            b"data: {\"a\":\r\ndata: 1}\r\n\r\n"  # two data lines make one JSON text
            b"id: 7\nretry: 10\ndata:{\"b\": 2}\n\n"  # other fields; no space after the colon
            b"data: [DONE]\n\n"
            b"data: {\"after\": \"done\"}\n\n")
    assert await sse(body) == [{"a": 1}, {"b": 2}]


@pytest.mark.parametrize("event", [
    b'data: {"error": {"message": "overloaded"}}\n\n',
    b'event: error\ndata: {"message": "x"}\n\n',
])
async def test_an_error_in_the_event_stream_raises(event: bytes) -> None:
    with pytest.raises(StreamedError):
        await sse(b'data: {"choices": []}\n\n' + event)


# Deadlines. Each case runs the real fake server on loopback with deadlines of a second or
# two; elapsed times are bounded below by the deadline and above by it plus MARGIN_S (time
# to notice and close), never by a tight wall-clock figure.

MARGIN_S = 2.0


async def failing_call(
    provider: OpenAIProvider, error: type[Exception], match: str, into: list[StreamItem]
) -> float:
    """Runs a call that must fail with ``error``; returns its elapsed seconds."""
    started = trio.current_time()
    with pytest.raises(error, match=match):
        await collect(provider, into=into)
    return trio.current_time() - started


async def assert_upstream_closed(server: FakeOpenAIServer) -> None:
    with trio.fail_after(2):
        await server.client_disconnected.wait()


async def test_keep_alive_comments_do_not_hold_off_the_first_token_deadline() -> None:
    items: list[StreamItem] = []
    reply = StreamReply(["late"], stall_after=0, keepalive_s=0.2)  # comments, never a token
    async with fake_openai_server(reply) as server:
        async with provider_for(
            server, request_timeout_s=0.5, model_first_token_timeout_s=1.5
        ) as provider:
            elapsed = await failing_call(
                provider, ProviderTimeoutError,
                r"^no first token from the model within 1\.5 s \(1 attempt\)$", items,
            )
            await assert_upstream_closed(server)

    assert 1.5 <= elapsed < 1.5 + MARGIN_S
    assert texts(items) == []


async def test_keep_alive_comments_after_the_first_token_do_not_hold_off_the_deadline() -> None:
    items: list[StreamItem] = []
    reply = StreamReply(["Hel", "lo"], stall_after=1, keepalive_s=0.2)
    async with fake_openai_server(reply) as server:
        async with provider_for(
            server, request_timeout_s=0.5, model_first_token_timeout_s=1, model_deadline_s=2
        ) as provider:
            elapsed = await failing_call(
                provider, ProviderTimeoutError, r"^the model's reply exceeded the 2 s deadline$",
                items,
            )
            await assert_upstream_closed(server)

    assert 2 <= elapsed < 2 + MARGIN_S
    assert texts(items) == ["Hel"]  # kept: the turn records it with the failure


async def test_only_content_or_tool_call_deltas_meet_the_first_token_deadline() -> None:
    empty = StreamReply(["", "", "", "", "", "late"], delay_s=0.3)  # role and empty content
    calls = [FakeToolCall("calculator", {"expression": "12*7"}, fragment_chars=2)]
    fragments = StreamReply(tool_calls=calls, delay_s=0.1)  # 1.1 s, the first one at once
    async with fake_openai_server(empty, fragments) as server:
        async with provider_for(server, model_first_token_timeout_s=0.8) as provider:
            elapsed = await failing_call(
                provider, ProviderTimeoutError, "no first token from the model within 0.8 s",
                [],
            )
            await assert_upstream_closed(server)
            items = await collect(provider)

    assert 0.8 <= elapsed < 0.8 + MARGIN_S
    assert only(items, ToolCallRequest).arguments == '{"expression": "12*7"}'


async def test_a_stall_before_the_headers_ends_at_the_first_token_deadline_retries_included(
) -> None:
    stalled = StreamReply(["late"], headers_delay_s=30)
    async with fake_openai_server(ErrorReply(500), ErrorReply(503), stalled) as server:
        async with provider_for(
            server, request_timeout_s=5, max_retries=2, model_first_token_timeout_s=2
        ) as provider:
            # Without the deadline: two back-off pauses, then 5 s before the third answer.
            elapsed = await failing_call(
                provider, ProviderTimeoutError,
                r"^no first token from the model within 2 s \(3 attempts\)$", [],
            )
            await assert_upstream_closed(server)

    assert 2 <= elapsed < 2 + MARGIN_S
    assert len(server.requests) == 3


async def test_attempts_that_time_out_say_how_long_each_waited_and_how_many_were_made() -> None:
    stalled = StreamReply(["late"], headers_delay_s=30)
    async with fake_openai_server(stalled, stalled) as server:
        async with provider_for(server, request_timeout_s=0.3, max_retries=1) as provider:
            elapsed = await failing_call(
                provider, ProviderTimeoutError,
                r"^the model server did not answer within 0\.3 s \(2 attempts\)$", [],
            )

    assert 0.6 <= elapsed < 0.6 + MARGIN_S  # two attempts and one back-off pause
    assert len(server.requests) == 2


async def test_a_back_off_pause_beyond_the_first_token_deadline_is_not_taken() -> None:
    refusal = ErrorReply(500, "overloaded", retry_after=None, retry_after_ms=None)
    async with fake_openai_server(refusal, StreamReply(["ok"])) as server:
        async with provider_for(server, model_first_token_timeout_s=0.3) as provider:
            # no pause asked for: the first back-off pause is 0.375-0.5 s
            elapsed = await failing_call(
                provider, ProviderUnavailableError,
                r"^the model server failed \(500\): overloaded; a retry after 0\.\d+ s would not"
                r" fit in the 0\.\d s left of the 0\.3 s first-token deadline$", [],
            )

    assert elapsed < 0.3
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "asked",
    [
        {"retry_after": 30, "retry_after_ms": None},
        {"retry_after_ms": 30_000},
        {"retry_after": "in 30 s", "retry_after_ms": None},  # an HTTP date, written below
    ],
    ids=["retry-after", "retry-after-ms", "retry-after-date"],
)
async def test_a_rate_limit_pause_beyond_the_first_token_deadline_fails_at_once(
    asked: dict[str, Any],
) -> None:
    if asked.get("retry_after") == "in 30 s":
        asked = asked | {"retry_after": email.utils.formatdate(time.time() + 30, usegmt=True)}
    refusal = ErrorReply(429, "slow down", **asked)
    async with fake_openai_server(refusal, StreamReply(["later"])) as server:
        async with provider_for(server, model_first_token_timeout_s=12) as provider:
            elapsed = await failing_call(
                provider, ProviderRateLimitedError,
                r"^the model is rate limited: it asked to retry after (29(\.\d+)?|30) s, beyond"
                r" the 1[12](\.\d)? s left of the 12 s first-token deadline$", [],
            )

    assert elapsed < 1
    assert len(server.requests) == 1


async def test_a_rate_limit_with_retry_after_0_is_retried_at_once() -> None:
    refusal = ErrorReply(429, "slow down", retry_after=0, retry_after_ms=None)
    async with fake_openai_server(refusal, StreamReply(["once"])) as server:
        async with provider_for(server, model_first_token_timeout_s=12) as provider:
            started = trio.current_time()
            items = await collect(provider)
            elapsed = trio.current_time() - started

    assert texts(items) == ["once"]
    assert len(server.requests) == 2
    assert elapsed < 0.3  # no back-off pause (0.375 s at least) where the server asked none
