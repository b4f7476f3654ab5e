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
