"""Errors of the web layer, and the one place where every other layer's errors become HTTP.

    WebError                    an answer of the contract: ``{"error": {"code", "message"}}``
    ├── BadRequestError         400 bad input (also quart-schema validation errors)
    ├── UnauthorizedError       401 missing or wrong bearer token
    ├── ForbiddenError          403 (only the WebSocket Origin check)
    ├── NotFoundError           404 no such chat, or not the caller's
    ├── ConflictError           409
    ├── PayloadTooLargeError    413
    ├── RateLimitedError        429, with ``Retry-After``
    │   └── QuotaExceededError  429 ``quota_exceeded``: a token budget is used up (``reset_at``)
    └── UnavailableError        503 store or model unavailable (the store: with ``Retry-After``)

    CoreTaskFailedError         not an answer: a core task of the server failed, which exits

``web_error(exc)`` maps a foreign error (domain, store, actors, model) to a ``WebError``;
``register_error_handlers(app)`` makes every failure, including Werkzeug's HTTP errors and
anything unexpected, a JSON error body: never an HTML page, never a stack trace.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import Any

from quart import Quart, Response, jsonify
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from ..actors.errors import (
    ActorCrashedError,
    ActorStoppedError,
    MailboxFullError,
    SubscriberDroppedError,
)
from ..events.errors import (
    AlreadyDecidedError,
    ChatNotFoundError,
    ChatRuleError,
    ConcurrencyError,
    DuplicateMessageError,
    FencedError,
    ResponseInProgressError,
    StoreError,
    ToolCallNotFoundError,
)
from ..llm.errors import LLMError, ProviderRateLimitedError, ProviderRequestError
from ..storage.errors import ViewStoreError

log = logging.getLogger(__name__)
#: ``Retry-After`` (seconds) of a 503 ``store_unavailable``.
STORE_RETRY_AFTER_S = 2


class WebError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def frame(self, **extra: object) -> dict[str, object]:
        """The WebSocket ``error`` frame for this error."""
        frame: dict[str, object] = {"event": "error", "code": self.code, "message": self.message}
        frame.update({k: v for k, v in extra.items() if v is not None})
        return frame


class BadRequestError(WebError):
    status, code = 400, "invalid_request"


class UnauthorizedError(WebError):
    status, code = 401, "unauthorized"


class ForbiddenError(WebError):
    status, code = 403, "forbidden"


class NotFoundError(WebError):
    status, code = 404, "not_found"


class ConflictError(WebError):
    status, code = 409, "conflict"


class PayloadTooLargeError(WebError):
    status, code = 413, "payload_too_large"

    def headers(self) -> dict[str, str]:
        # the rest of the body is never read: the connection cannot be reused
        return {"Connection": "close"}


class RateLimitedError(WebError):
    status, code = 429, "rate_limited"


class QuotaExceededError(RateLimitedError):
    """A user's token budget for the day is used up: ``Retry-After`` and ``reset_at`` (in the
    body and the frame) say when it starts again."""

    code = "quota_exceeded"

    def __init__(self, message: str, reset_at: datetime, now: datetime) -> None:
        super().__init__(message, retry_after=(reset_at - now).total_seconds())
        self.reset_at = reset_at.isoformat(timespec="seconds")

    def body(self) -> dict[str, dict[str, str]]:
        body = super().body()
        body["error"]["reset_at"] = self.reset_at
        return body

    def frame(self, **extra: object) -> dict[str, object]:
        return super().frame(reset_at=self.reset_at, **extra)


class UnavailableError(WebError):
    status, code = 503, "unavailable"


class CoreTaskFailedError(Exception):
    """A task the server cannot run without (the actor system and its bus, the views
    updater, the connection watcher) failed: the server has stopped, and its process exits
    with status 1 for its supervisor to start it again."""


def web_error(exc: BaseException) -> WebError | None:
    """The contract's error for a known foreign error, or None for an unexpected one."""
    if isinstance(exc, WebError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ChatNotFoundError):
        return NotFoundError("chat not found", exc.code)
    if isinstance(exc, DuplicateMessageError | ResponseInProgressError):
        return ConflictError(message, exc.code)
    if isinstance(exc, ConcurrencyError):
        return ConflictError(message, exc.code)
    if isinstance(exc, ToolCallNotFoundError):
        return NotFoundError(message, exc.code)
    if isinstance(exc, AlreadyDecidedError):
        return ConflictError(message, exc.code)
    if isinstance(exc, ChatRuleError):
        return BadRequestError(message, exc.code)
    if isinstance(exc, FencedError):
        return UnavailableError("the chat moved to another server: try again", exc.code,
                                retry_after=1)
    if isinstance(exc, StoreError | ViewStoreError):
        return UnavailableError("the event store is unavailable", "store_unavailable",
                                retry_after=STORE_RETRY_AFTER_S)
    if isinstance(exc, MailboxFullError):
        return RateLimitedError("the chat is busy: try again shortly", exc.code, retry_after=1)
    if isinstance(exc, ActorCrashedError):
        return UnavailableError("the chat is unavailable for a moment: try again",
                                "chat_unavailable", retry_after=1)
    if isinstance(exc, ActorStoppedError):
        return UnavailableError("the server is shutting down", exc.code)
    if isinstance(exc, SubscriberDroppedError):
        return UnavailableError(f"too slow to keep up: {exc.reason}", exc.code)
    if isinstance(exc, ProviderRateLimitedError):
        return RateLimitedError(message, exc.code, retry_after=5)
    if isinstance(exc, ProviderRequestError):
        return BadRequestError(message, exc.code)
    if isinstance(exc, LLMError):
        return UnavailableError(message, exc.code)
    return None


def _http_error(exc: HTTPException) -> WebError:
    status = exc.code or 500
    classes: dict[int, type[WebError]] = {
        400: BadRequestError,
        401: UnauthorizedError,
        403: ForbiddenError,
        404: NotFoundError,
        409: ConflictError,
        413: PayloadTooLargeError,
        429: RateLimitedError,
        503: UnavailableError,
    }
    cls = classes.get(status)
    name = (exc.name or "error").lower().replace(" ", "_")
    if cls is None:
        error = WebError(exc.description or exc.name or "error", name)
        error.status = status
        return error
    code = None if status in (400, 404, 413) else name
    if status == 404:
        code = "not_found"
    return cls(exc.description or exc.name or "error", code)


def error_response(error: WebError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers())
    return response


def register_error_handlers(app: Quart) -> None:
    """Every error the app can raise becomes the contract's JSON error body."""

    @app.errorhandler(RequestSchemaValidationError)
    async def validation(exc: RequestSchemaValidationError) -> Response:
        detail = getattr(exc.validation_error, "errors", None)
        text = str(exc.validation_error) if detail is None else _pydantic_message(detail())
        return error_response(BadRequestError(f"invalid request: {text}", "invalid_request"))

    @app.errorhandler(HTTPException)
    async def http(exc: HTTPException) -> Response:
        return error_response(_http_error(exc))

    @app.errorhandler(Exception)
    async def anything(exc: Exception) -> Response:
        error = web_error(exc)
        if error is None:
            log.exception("unexpected error", exc_info=exc)
            error = WebError("internal server error")
        return error_response(error)


def _pydantic_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
