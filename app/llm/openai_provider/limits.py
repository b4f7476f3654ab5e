"""The limits of one model call (first-token deadline, overall deadline, idle reads) and
the retry policy: which refusals are worth another attempt, and after what pause."""

from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass, field

import openai
import trio

from app.config import Settings
from app.llm.errors import ProviderTimeoutError

#: The ``openai`` client's back-off between retries: 0.5 s doubling up to 8 s, less 0-25 %.
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
#: Statuses worth another attempt, as the ``openai`` client has them (every 5xx too).
RETRY_STATUSES = frozenset({408, 409, 429})


@dataclass(slots=True)
class Limits:
    """The limits of one model call, its start (trio time) and the requests it has sent."""

    first_token_s: float
    total_s: float
    idle_s: float
    started: float = field(default_factory=trio.current_time)
    attempts: int = 0

    @classmethod
    def of(cls, settings: Settings) -> Limits:
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
            return f"the {seconds(self.first_token_s)} first-token deadline"
        return f"the {seconds(self.total_s)} deadline"

    def expired(self, first_token: bool) -> ProviderTimeoutError:
        if self._first_token_binds(first_token):
            return ProviderTimeoutError(
                f"no first token from the model within {seconds(self.first_token_s)}"
                f" ({attempts(self.attempts)})"
            )
        return ProviderTimeoutError(
            f"the model's reply exceeded the {seconds(self.total_s)} deadline"
        )


def retryable(exc: openai.OpenAIError) -> bool:
    """Whether the ``openai`` client would send the request again (``_should_retry``)."""
    if isinstance(exc, openai.APIStatusError):
        decided = exc.response.headers.get("x-should-retry")
        if decided in ("true", "false"):
            return decided == "true"
        return exc.status_code in RETRY_STATUSES or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)  # timeouts included


def retry_after(exc: openai.OpenAIError) -> float | None:
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


def backoff(count: int) -> float:
    """The ``openai`` client's pause after ``count`` failed attempts, jitter included."""
    delay = min(INITIAL_RETRY_DELAY_S * 2.0 ** (count - 1), MAX_RETRY_DELAY_S)
    return delay * (1 - 0.25 * random.random())


def seconds(value: float, digits: int = 2) -> str:
    return f"{round(value, digits):g} s"


def attempts(count: int) -> str:
    return f"{count} attempt{'' if count == 1 else 's'}"
