"""The fake OpenAI server itself, as other suites use it: plain HTTP, no provider."""

from __future__ import annotations

import json

import httpx2
import trio

from tests.fakes.openai_server import ErrorReply, StreamReply, fake_openai_server


async def test_speaks_sse_in_the_openai_chunk_format() -> None:
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with fake_openai_server(StreamReply(["Hel", "lo"])) as server:
        async with httpx2.AsyncClient() as client:
            with trio.fail_after(5):
                response = await client.post(f"{server.base_url}/chat/completions", json=body)

    events = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert response.headers["content-type"] == "text/event-stream"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:2]] == ["Hel", "lo"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 2
    assert server.requests == [body]


async def test_answers_plain_completions_models_and_errors() -> None:
    plain = {"model": "m", "messages": [{"role": "user", "content": "ping"}]}
    async with fake_openai_server(ErrorReply(429, "busy")) as server:
        async with httpx2.AsyncClient(base_url=server.base_url) as client:
            with trio.fail_after(5):
                refused = await client.post("/chat/completions", json=plain)
                echoed = await client.post("/chat/completions", json=plain)
                models = await client.get("/models")
                missing = await client.get("/nothing")

    assert refused.status_code == 429 and refused.headers["retry-after"] == "0"
    assert refused.json()["error"]["message"] == "busy"
    message = echoed.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "You said: ping"}
    assert models.json()["data"][0]["id"] == "fake-model"
    assert missing.status_code == 404
    assert len(server.requests) == 2


async def test_sends_keep_alive_comments_through_a_stall() -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    reply = StreamReply(["a"], stall_after=0, stall_s=0.5, keepalive_s=0.2)
    async with fake_openai_server(reply) as server:
        async with httpx2.AsyncClient() as client:
            with trio.fail_after(5):
                response = await client.post(f"{server.base_url}/chat/completions", json=body)

    events = response.text.split("\n\n")
    assert events[:2] == [": keep-alive", ": keep-alive"]  # at 0.2 s and 0.4 s
    assert events[2].startswith("data: ") and json.loads(events[2][6:])["choices"]


async def test_error_replies_carry_the_retry_after_asked() -> None:
    async with fake_openai_server(
        ErrorReply(429, retry_after=30, retry_after_ms=None),
        ErrorReply(503, retry_after="Wed, 21 Oct 2099 07:28:00 GMT", retry_after_ms=2500),
        ErrorReply(500, retry_after=None, retry_after_ms=None),
    ) as server:
        async with httpx2.AsyncClient(base_url=server.base_url) as client:
            with trio.fail_after(5):
                answers = [await client.post("/chat/completions", json={}) for _ in range(3)]

    headers = [(a.headers.get("retry-after"), a.headers.get("retry-after-ms")) for a in answers]
    assert headers == [("30", None), ("Wed, 21 Oct 2099 07:28:00 GMT", "2500"), (None, None)]
    assert [a.status_code for a in answers] == [429, 503, 500]
