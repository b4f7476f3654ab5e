"""``openai`` client errors mapped, once, to ``app.llm.errors``, with the API key redacted."""

from __future__ import annotations

import httpx2
import openai

from app.llm.errors import (
    LLMError,
    ProviderProtocolError,
    ProviderRateLimitedError,
    ProviderRequestError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)

from .limits import attempts, seconds

MAX_ERROR_TEXT = 300


class Failures:
    """Maps the errors of a client of ``base_url`` whose key is ``secret`` (redacted from
    every message, which is also cut to ``MAX_ERROR_TEXT`` characters)."""

    def __init__(self, secret: str, base_url: httpx2.URL, request_timeout_s: float) -> None:
        self._secret = secret
        self._base_url = base_url
        self._timeout_s = request_timeout_s

    def redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:MAX_ERROR_TEXT]

    def request_error(self, exc: openai.OpenAIError, count: int = 1) -> LLMError:
        """``exc`` as an ``LLMError``, saying how many attempts were made when more than one."""
        error = self.mapped(exc)
        return type(error)(f"{error} ({attempts(count)})") if count > 1 else error

    def mapped(self, exc: openai.OpenAIError) -> LLMError:
        if isinstance(exc, openai.APITimeoutError):
            return ProviderTimeoutError(
                f"the model server did not answer within {seconds(self._timeout_s)}"
            )
        if isinstance(exc, openai.APIConnectionError):
            url = self._base_url  # shown without any credentials it may carry
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
            f"unexpected answer from the model server: {self.redact(str(exc))}"
        )

    def _describe(self, exc: openai.APIError) -> str:
        body = exc.body
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return self.redact(body["message"])
        return self.redact(exc.message)
