"""The request of one model call: its JSON body, sent as built, answered as a raw stream."""

from __future__ import annotations

from typing import Any

import httpx2
import openai

from app.llm.base import ModelRequest

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"


def body(request: ModelRequest, model: str) -> dict[str, Any]:
    """The ``/chat/completions`` body of ``request`` for ``model``: streamed, with usage."""
    built: dict[str, Any] = {
        "model": model,
        "messages": request.messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        built["tools"] = [tool.to_openai() for tool in request.tools]
    if request.max_tokens is not None:
        built["max_tokens"] = request.max_tokens
    return built


async def post(client: openai.AsyncOpenAI, built: dict[str, Any]) -> httpx2.Response:
    """Sends ``built`` once; raises the ``openai`` client's errors (``openai.OpenAIError``).

    The body is sent as built: the client's ``create()`` would walk every message through
    its type-driven transform (about a third of a busy server's CPU) to no effect on plain
    text messages and tool specs. The answer comes back as the raw streamed response (the
    client's timeouts, auth and error statuses still apply), read by ``sse.sse_data``: the
    client's generic event-stream decoder and its per-chunk processing cost a third of what
    a whole turn costs the server.
    """
    return await client.post(
        "/chat/completions",
        body=built,
        options={"security": {"bearer_auth": True}},
        cast_to=httpx2.Response,
        stream=True,
    )
