"""Request and response models of the REST API: validation and the served ``/openapi.json``.

Requests forbid unknown fields only where a typo would silently change the meaning; answers
are documented with the contract's shapes (``Chat``, ``Message``, ``Stats``, ``Error``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel

from ..events.text import text_problem

MAX_ID = 200
#: Largest ``seq`` a request may name (the views store seqs as 32-bit integers).
MAX_SEQ = 2**31 - 1


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: A string that may be stored and queried: no NUL, no lone surrogate (``app.events.text``).
Text = Annotated[str, AfterValidator(_storable)]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- requests ---------------------------------------------------------------------------------


class CreateChat(BaseModel):
    title: Text | None = Field(None, max_length=200)
    model: Text | None = Field(None, max_length=200)
    system_prompt: Text | None = Field(None, max_length=32_000)
    #: Most tokens the model may generate per call in this chat (default: the server's).
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)


class UpdateChat(BaseModel):
    """``PATCH /chat/{id}``: the fields given change (``model`` and ``system_prompt`` may be
    null: the server's default model, no system prompt); a misspelt field is refused."""

    model_config = ConfigDict(extra="forbid")
    title: Text | None = Field(None, min_length=1, max_length=200)
    model: Text | None = Field(None, min_length=1, max_length=200)
    system_prompt: Text | None = Field(None, max_length=32_000)


class Generate(BaseModel):
    message: Text
    chat_id: UUID | None = None
    client_message_id: Text | None = Field(None, min_length=1, max_length=MAX_ID)
    stream: bool = False
    #: The model for this turn (one ``GET /models`` lists); default: the chat's.
    model: Text | None = Field(None, max_length=200)


class ChatsQuery(BaseModel):
    limit: int = Field(50, ge=1, le=200)
    cursor: Text | None = Field(None, max_length=500)
    q: Text | None = Field(None, max_length=500)


class ChatQuery(BaseModel):
    limit: int = Field(100, ge=1, le=500)
    before_seq: int | None = Field(None, ge=1, le=MAX_SEQ)
    #: The chat as it was right after this event (time travel), rebuilt from the log.
    at_seq: int | None = Field(None, ge=1, le=MAX_SEQ)


class EventsQuery(BaseModel):
    after_seq: int = Field(0, ge=0, le=MAX_SEQ)
    limit: int = Field(500, ge=1, le=1000)


class StatsQuery(BaseModel):
    chat_id: UUID | None = None


# -- answers ------------------------------------------------------------------------------


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Timing(BaseModel):
    model_config = ConfigDict(extra="allow")
    ttft_ms: float | None = None
    duration_ms: float | None = None
    tokens_per_second: float | None = None


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    call_id: str
    tool: str
    arguments: Any = None
    result: Any = None
    error: str | None = None
    duration_ms: float | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    seq: int
    role: Literal["user", "assistant"]
    content: str
    created_at: str
    client_message_id: str | None = None
    response_id: str | None = None
    status: Literal["complete", "streaming", "failed", "stopped", "interrupted"] | None = None
    model: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    tool_calls: list[ToolCall] | None = None
    error: Any = None
    #: How a complete reply ended (``stop``, ``length``, ...); null otherwise.
    finish_reason: str | None = None


class Chat(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: UUID
    title: str
    created_at: str
    updated_at: str
    model: str | None = None
    message_count: int
    usage: Usage


class ChatList(BaseModel):
    chats: list[Chat]
    next_cursor: str | None


class ChatPage(BaseModel):
    chat: Chat
    messages: list[Message]
    has_more: bool


class GenerateAnswer(BaseModel):
    chat_id: UUID
    response_id: str
    message: Message


class Stopped(BaseModel):
    chat_id: UUID
    stopped: bool


class StoredEvent(BaseModel):
    seq: int
    type: str
    timestamp: str
    data: dict[str, Any]
    #: The event's link of the audit chain, hex (docs/audit.md).
    hash: str | None


class EventPage(BaseModel):
    events: list[StoredEvent]
    next_after_seq: int


class Audit(BaseModel):
    chat_id: UUID
    head_seq: int
    head_hash: str
    valid: bool
    first_invalid_seq: int | None
    reason: Literal["modified", "missing", "reordered", "truncated"] | None


class ExportQuery(BaseModel):
    #: ``jsonl``: the event log, one event a line, with the bytes each audit link covers;
    #: ``openai``: ``{"messages": [...]}`` in the OpenAI chat format; ``markdown``: a
    #: readable transcript.
    format: str = "jsonl"


class ExportText(RootModel[str]):
    """The export in the format asked for (``jsonl``: ``application/x-ndjson``; ``openai``:
    ``application/json``; ``markdown``: ``text/markdown``)."""


class Percentiles(BaseModel):
    model_config = ConfigDict(extra="allow")
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class Live(BaseModel):
    connections: int
    active_chats: int
    generating: int


class Stats(BaseModel):
    model_config = ConfigDict(extra="allow")
    totals: dict[str, int | float]
    latency_ms: Percentiles
    ttft_ms: Percentiles
    tokens_per_second: dict[str, float | None]
    tools: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]]
    live: Live


class ModelInfo(BaseModel):
    id: str
    #: The name of the upstream (model server) that serves it.
    provider: str
    default: bool


class ModelList(BaseModel):
    models: list[ModelInfo]


class DayUsage(BaseModel):
    day: str
    model: str
    responses: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class BudgetInfo(BaseModel):
    daily_tokens: int | None
    models: dict[str, int]
    resets_at: str


class UsagePage(BaseModel):
    usage: list[DayUsage]
    budget: BudgetInfo


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "degraded", "unavailable"]
    store: str


class NoContent(RootModel[None]):
    """No body (204)."""


class PrometheusText(RootModel[str]):
    """The Prometheus text exposition format (``text/plain; version=0.0.4``)."""
