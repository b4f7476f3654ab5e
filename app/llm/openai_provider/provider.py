"""``OpenAIProvider``: opens a streamed completion, retrying refusals within the deadlines
(see the package's docstring), and hands its chunks to a ``ChunkReader``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import openai
import trio

from app.config import Settings
from app.llm.base import ModelRequest, StreamItem
from app.llm.errors import ProviderRateLimitedError

from .chunks import ChunkReader
from .failures import Failures
from .limits import Limits, backoff, retry_after, retryable, seconds
from .request import DEFAULT_BASE_URL, DEFAULT_MODEL, body, post

#: How long closing an abandoned stream may take, even under cancellation.
CLOSE_TIMEOUT_S = 2.0


class OpenAIProvider:
    """Streams chat completions from an OpenAI-compatible server.

    ``http_client`` (an ``httpx2.AsyncClient``) is handed to the ``openai`` client, which then
    owns it: ``aclose()`` closes it.
    """

    name = "openai"

    def __init__(self, settings: Settings, http_client: httpx2.AsyncClient | None = None) -> None:
        self._settings = settings
        self._client = openai.AsyncOpenAI(
            # Local servers (llama.cpp, Ollama) need no key, but the client insists on one.
            api_key=settings.openai_api_key or "unused",
            base_url=settings.openai_base_url or DEFAULT_BASE_URL,
            max_retries=0,  # retried by ``_open``, within the deadlines
            timeout=httpx2.Timeout(settings.request_timeout_s),
            http_client=http_client,
        )
        self._failures = Failures(
            settings.openai_api_key or "", self._client.base_url, settings.request_timeout_s
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
        limits = Limits.of(self._settings)
        model = request.model or self.default_model
        upstream = await self._open(body(request, model), limits)
        reader = ChunkReader(upstream, request, model, limits, self._failures.redact)
        try:
            yield reader
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                try:
                    await reader.aclose()
                    await upstream.aclose()
                except (httpx2.HTTPError, httpx2.StreamError):
                    pass  # The connection is being abandoned anyway.

    async def aclose(self) -> None:
        """Closes the ``openai`` client and its connection pool."""
        await self._client.close()

    async def _open(self, built: dict[str, Any], limits: Limits) -> httpx2.Response:
        """Sends the request, and again after a refusal while retries and time are left."""
        with trio.move_on_at(limits.deadline(False)):
            while True:
                limits.attempts += 1
                try:
                    return await post(self._client, built)
                except openai.OpenAIError as exc:
                    await self._pause_to_retry(exc, limits)
        raise limits.expired(False)

    async def _pause_to_retry(self, exc: openai.OpenAIError, limits: Limits) -> None:
        """Sleeps before the next attempt, or raises the mapped error when there is none:
        no retry left, a final refusal, or a pause that would outlast the first-token
        deadline (then at once)."""
        if limits.attempts > self._settings.max_retries or not retryable(exc):
            raise self._failures.request_error(exc, limits.attempts) from exc
        asked = retry_after(exc)
        pause = backoff(limits.attempts) if asked is None else asked
        left = limits.left()
        if pause < left:
            await trio.sleep(pause)
            return
        beyond = f"the {seconds(left, 1)} left of {limits.name(False)}"
        if isinstance(exc, openai.RateLimitError) and asked is not None:
            raise ProviderRateLimitedError(
                f"the model is rate limited: it asked to retry after {seconds(asked)},"
                f" beyond {beyond}"
            ) from exc
        error = self._failures.request_error(exc, limits.attempts)
        raise type(error)(
            f"{error}; a retry after {seconds(pause)} would not fit in {beyond}"
        ) from exc
