"""OpenTelemetry traces of the turns, in the GenAI semantic conventions.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, ``Telemetry.from_settings`` loads the
OpenTelemetry SDK and its OTLP exporter (HTTP/protobuf, to ``<endpoint>/v1/traces``,
batched in the SDK's own thread) and each turn is one trace::

    invoke_agent eventchat          the turn (gen_ai.conversation.id: the chat id)
    ├── chat {model}                each model call: models, usage, finish reasons
    ├── execute_tool {tool}         each tool call: its name and call id
    └── chat {model}                the call that reads the tools' results

Unset, ``from_settings`` returns None, nothing of OpenTelemetry is imported (this module
imports it only inside the functions that run once it is on) and nothing is wrapped.

The hooks are thin: ``instrument`` wraps the model provider (each upstream of a
``ModelRouter``) and the ``ToolRegistry``'s calls, and the actor opens ``turn`` around a
turn. Message content (the messages sent, the reply, tool arguments and results) goes into
spans only with ``EVENTCHAT_OTEL_CONTENT=1``: spans hold what users wrote otherwise.
Instrumentation never fails a turn: the wrapped call's own errors pass through unchanged,
recorded on the span (``error.type``: the error's ``code``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
    nullcontext,
)
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import trio

from .config import Settings
from .llm.base import (
    Finish,
    ModelRequest,
    Provider,
    StreamItem,
    TextDelta,
    ToolCallRequest,
    ToolContext,
    Usage,
)
from .llm.router import ModelRouter
from .llm.tools import ToolCall, ToolRegistry

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)
#: Longest wait for the last spans' export at shutdown.
FLUSH_S = 3.0
#: ``gen_ai.agent.name`` of the turn spans.
AGENT = "eventchat"
#: The chat whose turn runs in this task (``gen_ai.conversation.id`` of the model calls).
_conversation: ContextVar[str | None] = ContextVar("eventchat_conversation", default=None)


class Telemetry:
    """Makes the spans of turns, model calls and tool calls with ``tracer``; ``content``
    puts message content in them."""

    def __init__(self, tracer: Tracer, content: bool = False,
                 shutdown: Callable[[], object] | None = None) -> None:
        self.tracer = tracer
        self.content = content
        self._shutdown = shutdown

    @classmethod
    def from_settings(cls, settings: Settings) -> Telemetry | None:
        """An OTLP exporter to ``settings.otel_exporter_otlp_endpoint``, or None (nothing
        imported) when it is not set. Blocking (imports): run it in a worker thread."""
        endpoint = settings.otel_exporter_otlp_endpoint
        if not endpoint:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # with OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": AGENT}))
        provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("traces: OTLP/HTTP to %s/v1/traces%s", endpoint.rstrip("/"),
                 ", with message content" if settings.otel_content else "")
        return cls(provider.get_tracer("eventchat"), settings.otel_content, provider.shutdown)

    async def aclose(self) -> None:
        """Exports the spans still waiting, for at most ``FLUSH_S`` (in a worker thread,
        left behind after that: a collector that is down never holds a shutdown up)."""
        if self._shutdown is not None:
            with trio.move_on_after(FLUSH_S):
                await trio.to_thread.run_sync(self._shutdown, abandon_on_cancel=True)

    # -- hooks ------------------------------------------------------------------------------

    def instrument(self, provider: Provider, tools: ToolRegistry) -> Provider:
        """Traces ``tools``' calls, and returns ``provider`` with its model calls traced."""
        tools.wrapper = self._tool_call
        if isinstance(provider, ModelRouter):
            return provider.wrapped(lambda upstream: TracedProvider(upstream, self))
        return TracedProvider(provider, self)

    @contextmanager
    def turn(self, chat_id: str, response_id: str, model: str) -> Iterator[None]:
        """The span of one turn, current in this task while it runs."""
        from opentelemetry.trace import SpanKind

        token = _conversation.set(chat_id)
        try:
            with self.tracer.start_as_current_span(
                f"invoke_agent {AGENT}", kind=SpanKind.INTERNAL,
                attributes={"gen_ai.operation.name": "invoke_agent",
                            "gen_ai.agent.name": AGENT, "gen_ai.request.model": model,
                            "gen_ai.conversation.id": chat_id,
                            "eventchat.response_id": response_id},
            ):
                yield
        finally:
            _conversation.reset(token)

    async def _tool_call(self, name: str, raw_arguments: str, context: ToolContext,
                         call: ToolCall) -> Any:
        from opentelemetry.trace import SpanKind

        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
            "gen_ai.tool.type": "function", "gen_ai.conversation.id": context.chat_id,
        }
        if context.call_id is not None:
            attributes["gen_ai.tool.call.id"] = context.call_id
        if self.content:
            attributes["gen_ai.tool.call.arguments"] = raw_arguments
        with self.tracer.start_as_current_span(
            f"execute_tool {name}", kind=SpanKind.INTERNAL, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                result = await call(name, raw_arguments, context)
            except Exception as exc:
                failed(span, exc)
                raise
            if self.content:
                span.set_attribute("gen_ai.tool.call.result", json.dumps(result, default=str))
            return result


class TracedProvider:
    """A provider whose every stream is a ``chat {model}`` span."""

    def __init__(self, inner: Provider, telemetry: Telemetry) -> None:
        self.inner = inner
        self.telemetry = telemetry
        self.name = inner.name

    @property
    def default_model(self) -> str:
        return self.inner.default_model

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[StreamItem]]:
        return self._stream(request)

    @asynccontextmanager
    async def _stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[StreamItem]]:
        from opentelemetry.trace import SpanKind

        telemetry = self.telemetry
        model = request.model or self.inner.default_model
        span = telemetry.tracer.start_span(
            f"chat {model}", kind=SpanKind.CLIENT, attributes=request_attributes(
                request, model, self.name, telemetry.content))
        seen = ModelCall(span, telemetry.content)
        try:
            async with self.inner.stream(request) as items:
                yield seen.observe(items)
        except Exception as exc:
            failed(span, exc)
            raise
        finally:
            seen.finish()
            span.end()

    async def aclose(self) -> None:
        await self.inner.aclose()


class ModelCall:
    """What one model call streamed, for its span's attributes."""

    def __init__(self, span: Span, content: bool) -> None:
        self.span = span
        self.content = content
        self.text: list[str] = []
        self.calls: list[ToolCallRequest] = []
        self.reason: str | None = None

    def observe(self, items: AsyncIterator[StreamItem]) -> AsyncIterator[StreamItem]:
        return _Observed(items, self.see)

    def see(self, item: StreamItem) -> None:
        if isinstance(item, TextDelta):
            if self.content:
                self.text.append(item.text)
        elif isinstance(item, ToolCallRequest):
            self.calls.append(item)
        elif isinstance(item, Usage):
            self.span.set_attribute("gen_ai.usage.input_tokens", item.prompt_tokens)
            self.span.set_attribute("gen_ai.usage.output_tokens", item.completion_tokens)
        elif isinstance(item, Finish):
            self.reason = item.reason
            self.span.set_attribute("gen_ai.response.finish_reasons", [item.reason])
            if item.model:
                self.span.set_attribute("gen_ai.response.model", item.model)

    def finish(self) -> None:
        if not self.content:
            return
        parts: list[dict[str, Any]] = []
        if self.text:
            parts.append({"type": "text", "content": "".join(self.text)})
        parts.extend({"type": "tool_call", "id": c.call_id, "name": c.name,
                      "arguments": c.arguments} for c in self.calls)
        message = {"role": "assistant", "parts": parts, "finish_reason": self.reason or ""}
        self.span.set_attribute("gen_ai.output.messages", json.dumps([message]))


class _Observed:
    """``items`` as they are, each shown to ``see`` first (a plain iterator: nothing to
    close)."""

    def __init__(self, items: AsyncIterator[StreamItem], see: Callable[[StreamItem], None]
                 ) -> None:
        self._items = items
        self._see = see

    def __aiter__(self) -> _Observed:
        return self

    async def __anext__(self) -> StreamItem:
        item = await self._items.__anext__()
        self._see(item)
        return item


def request_attributes(request: ModelRequest, model: str, provider: str,
                       content: bool) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    conversation = _conversation.get()
    if conversation is not None:
        attributes["gen_ai.conversation.id"] = conversation
    if request.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = request.max_tokens
    if content:
        system, messages = input_messages(request.messages)
        if system:
            attributes["gen_ai.system_instructions"] = json.dumps(system)
        attributes["gen_ai.input.messages"] = json.dumps(messages)
    return attributes


def input_messages(
    messages: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenAI chat messages in the conventions' shape: the system instructions apart, then
    each message as ``{"role", "parts"}``."""
    system: list[dict[str, Any]] = []
    shaped: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role", ""), message.get("content")
        if role == "system":
            system.append({"type": "text", "content": content})
            continue
        parts: list[dict[str, Any]] = []
        if role == "tool":
            parts.append({"type": "tool_call_response", "id": message.get("tool_call_id"),
                          "response": content})
        elif content is not None:
            parts.append({"type": "text", "content": content})
        for call in message.get("tool_calls") or ():
            function = call.get("function", {})
            parts.append({"type": "tool_call", "id": call.get("id"),
                          "name": function.get("name"), "arguments": function.get("arguments")})
        shaped.append({"role": role, "parts": parts})
    return system, shaped


def failed(span: Span, exc: BaseException) -> None:
    """Marks ``span`` as ended by ``exc`` (its ``code``, else its class name)."""
    from opentelemetry.trace import Status, StatusCode

    kind = getattr(exc, "code", None) or type(exc).__qualname__
    span.set_attribute("error.type", str(kind))
    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))


def turn_span(telemetry: Telemetry | None, chat_id: object, response_id: str,
              model: str) -> AbstractContextManager[None]:
    """``telemetry.turn(...)``, or nothing when telemetry is off."""
    if telemetry is None:
        return nullcontext()
    return telemetry.turn(str(chat_id), response_id, model)
