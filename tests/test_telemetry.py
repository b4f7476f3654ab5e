"""OpenTelemetry traces of the turns: GenAI spans seen through the SDK's in-memory exporter
on a real server, content only when asked for, OTLP export to a collector over HTTP, and
nothing of OpenTelemetry loaded when it is not configured."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from app.config import Settings
from app.llm.base import ModelRequest, TextDelta, ToolContext
from app.llm.errors import LLMError, ToolError
from app.llm.offline import OfflineProvider
from app.llm.tools import default_registry
from app.telemetry import Telemetry
from tests.conftest import base_settings
from tests.web.conftest import running_server, web_settings


def in_memory(content: bool = False) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(provider.get_tracer("test"), content), exporter


def values(span: ReadableSpan) -> str:
    return json.dumps({k: str(v) for k, v in (span.attributes or {}).items()})


async def test_a_turn_is_a_trace_of_genai_spans(tmp_path: Path) -> None:
    telemetry, exporter = in_memory()
    settings = web_settings(base_settings(tmp_path / "data"))
    async with running_server(settings, telemetry=telemetry) as server, server.client() as c:
        answer = (await c.post("/generate", json={"message": "what is 12*7"})).json()
    chat_id, message = answer["chat_id"], answer["message"]
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == [
        "chat offline", "chat offline", "execute_tool calculator", "invoke_agent eventchat"]
    turn = next(s for s in spans if s.name == "invoke_agent eventchat")
    assert turn.parent is None and turn.context is not None
    assert turn.attributes is not None
    assert turn.attributes["gen_ai.conversation.id"] == chat_id
    assert turn.attributes["gen_ai.operation.name"] == "invoke_agent"
    children = [s for s in spans if s is not turn]
    for span in children:  # one trace, every call a child of the turn
        assert span.parent is not None and span.parent.span_id == turn.context.span_id
        assert span.context is not None and span.context.trace_id == turn.context.trace_id
    asks, answers = sorted((s for s in spans if s.name == "chat offline"),
                           key=lambda s: s.start_time or 0)
    tool = next(s for s in spans if s.name.startswith("execute_tool"))
    assert asks.end_time is not None and tool.start_time is not None
    assert asks.end_time <= tool.start_time  # the model asked, then the tool ran
    for span, reason in ((asks, "tool_calls"), (answers, "stop")):
        a = span.attributes
        assert a is not None
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "offline"
        assert a["gen_ai.provider.name"] == "offline"
        assert a["gen_ai.conversation.id"] == chat_id
        assert tuple(a["gen_ai.response.finish_reasons"]) == (reason,)  # type: ignore[arg-type]
        assert isinstance(a["gen_ai.usage.input_tokens"], int)
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert sum(s.attributes["gen_ai.usage.output_tokens"]  # type: ignore[index,misc]
               for s in (asks, answers)) == message["usage"]["completion_tokens"]
    assert tool.attributes is not None
    assert tool.attributes["gen_ai.tool.name"] == "calculator"
    assert tool.attributes["gen_ai.tool.call.id"] == message["tool_calls"][0]["call_id"]
    # no message content by default: not the question, not the reply, not the arguments
    for span in spans:
        text = values(span)
        assert "12*7" not in text and message["content"] not in text and "expression" not in text


async def test_content_only_when_opted_in(tmp_path: Path) -> None:
    settings = base_settings(tmp_path)
    for content in (False, True):
        telemetry, exporter = in_memory(content)
        tools = default_registry(settings)
        provider = telemetry.instrument(OfflineProvider(settings), tools)
        request = ModelRequest([{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hello there"}])
        with telemetry.turn("chat-1", "r-1", "offline"):
            async with provider.stream(request) as items:
                reply = "".join([i.text async for i in items if isinstance(i, TextDelta)])
            await tools.call("calculator", '{"expression": "6*7"}',
                             ToolContext("alice", "chat-1", "call-1"))
        chat, tool = (next(s for s in exporter.get_finished_spans() if s.name == name)
                      for name in ("chat offline", "execute_tool calculator"))
        assert chat.attributes is not None and tool.attributes is not None
        text = values(chat) + values(tool)
        assert ("hello there" in text) is content and ("be brief" in text) is content
        assert (reply[-20:] in text) is content and ("6*7" in text) is content
        if content:
            assert json.loads(str(chat.attributes["gen_ai.input.messages"])) == [
                {"role": "user", "parts": [{"type": "text", "content": "hello there"}]}]
            output = json.loads(str(chat.attributes["gen_ai.output.messages"]))
            assert output[0]["parts"] == [{"type": "text", "content": reply}]
            assert tool.attributes["gen_ai.tool.call.result"] == "42"


@asynccontextmanager
async def collector() -> AsyncIterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """An OTLP/HTTP collector on loopback: the export requests it received."""
    received: list[ExportTraceServiceRequest] = []

    async def serve(stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.Request):
                assert event.target == b"/v1/traces"
        received.append(ExportTraceServiceRequest.FromString(body))
        answer = ExportTraceServiceResponse().SerializeToString()
        await stream.send_all(http.send(h11.Response(status_code=200, headers=[
            ("Content-Type", "application/x-protobuf"), ("Content-Length", str(len(answer))),
            ("Connection", "close")])) + http.send(h11.Data(data=answer))
            + http.send(h11.EndOfMessage()))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}", received
        nursery.cancel_scope.cancel()


async def test_spans_are_exported_with_otlp_when_the_endpoint_is_set(tmp_path: Path) -> None:
    async with collector() as (endpoint, received):
        settings = base_settings(tmp_path).replace(otel_exporter_otlp_endpoint=endpoint)
        telemetry = Telemetry.from_settings(settings)
        assert telemetry is not None
        tools = default_registry(settings)
        telemetry.instrument(OfflineProvider(settings), tools)
        with telemetry.turn("chat-1", "r-1", "offline"):
            await tools.call("calculator", '{"expression": "1+1"}',
                             ToolContext("alice", "chat-1", "call-1"))
        with trio.fail_after(20):
            await telemetry.aclose()  # exports what waits
    spans = [span for request in received for rs in request.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    assert sorted(s.name for s in spans) == ["execute_tool calculator", "invoke_agent eventchat"]
    resource = {a.key: a.value.string_value
                for a in received[0].resource_spans[0].resource.attributes}
    assert resource["service.name"] == "eventchat"


def test_nothing_is_loaded_when_no_endpoint_is_set() -> None:
    script = (
        "import sys\n"
        "from app.config import Settings\n"
        "from app.telemetry import Telemetry\n"
        "import app.web.server, app.cli\n"
        "assert Telemetry.from_settings(Settings.from_env({})) is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def settings_of(environ: dict[str, str]) -> Settings:
    return Settings.from_env(environ)


def test_the_settings_read_the_standard_variable() -> None:
    s = settings_of({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                     "EVENTCHAT_OTEL_CONTENT": "1"})
    assert s.otel_exporter_otlp_endpoint == "http://collector:4318" and s.otel_content
    assert settings_of({}).otel_exporter_otlp_endpoint is None
    assert not settings_of({}).otel_content


async def test_failures_are_recorded_on_their_spans(tmp_path: Path) -> None:
    telemetry, exporter = in_memory()
    settings = base_settings(tmp_path)
    tools = default_registry(settings)
    provider = telemetry.instrument(OfflineProvider(settings), tools)
    with telemetry.turn("chat-1", "r-1", "offline"):
        with pytest.raises(LLMError) as model_error:
            async with provider.stream(ModelRequest([{"role": "user", "content": "/fail"}])
                                       ) as items:
                async for _ in items:
                    pass
        with pytest.raises(ToolError) as tool_error:
            await tools.call("calculator", '{"expression": "1/0"}',
                             ToolContext("alice", "chat-1", "call-1"))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name, error in (("chat offline", model_error.value),
                        ("execute_tool calculator", tool_error.value)):
        span = spans[name]
        assert span.attributes is not None
        assert span.attributes["error.type"] == error.code
        assert span.status.status_code is StatusCode.ERROR
    assert spans["invoke_agent eventchat"].status.status_code is StatusCode.UNSET
