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

Every ``openai``/``httpx2`` error is mapped once, to an ``app.llm.errors`` error (with
``raise ... from exc``); the API key never appears in their messages. ``trio.Cancelled``
always propagates; leaving ``stream()`` for any reason (a deadline too) closes the upstream
HTTP response, so a user's stop also closes the connection to the model server.

The modules, in the order a call goes through them:

- ``provider``: ``OpenAIProvider``, which opens the call and retries it;
- ``request``: the request body, and its sending as a raw streamed response;
- ``limits``: the call's deadlines and the retry policy (which refusals, what pause);
- ``failures``: ``openai``/``httpx2`` errors mapped to ``app.llm.errors``, key redacted;
- ``sse``: the event-stream decoder (``data`` of each event, up to ``[DONE]``);
- ``chunks``: the streamed ``chat.completion.chunk`` objects turned into ``StreamItem``s.
"""

from __future__ import annotations

from .chunks import SERVER_TIMING_FIELDS as SERVER_TIMING_FIELDS
from .provider import OpenAIProvider as OpenAIProvider
from .request import DEFAULT_BASE_URL as DEFAULT_BASE_URL
from .request import DEFAULT_MODEL as DEFAULT_MODEL

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_MODEL", "SERVER_TIMING_FIELDS", "OpenAIProvider"]
