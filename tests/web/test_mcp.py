"""MCP tools end to end: a real MCP server process over stdio (the SDK's, started by the
server), a scripted model on the fake OpenAI server, the real server and a WebSocket client."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from app.config import McpServer, Settings
from app.llm.mcp import McpTools
from app.llm.tools import default_registry
from tests.fakes.openai_server import FakeToolCall, StreamReply, fake_openai_server

from .conftest import receive_until, running_server, send, web_settings

FAKE_SERVER = Path(__file__).resolve().parent.parent / "fakes" / "mcp_server.py"


def tool_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["event"] == "tool_activity"]


def done_frame(frames: list[dict[str, Any]]) -> dict[str, Any]:
    return next(f for f in frames if f["event"] == "ai_response" and f.get("done"))


def history(frame: dict[str, Any]) -> bool:
    return frame["event"] == "chat_history"


async def test_a_tool_from_an_mcp_server_is_offered_called_recorded_and_survives_its_crash(
    settings: Settings, tmp_path: Path
) -> None:
    pid_file = tmp_path / "mcp.pid"
    entry = McpServer(
        "fake", command=(sys.executable, str(FAKE_SERVER), "--pid-file", str(pid_file))
    )
    s = web_settings(settings, provider="openai", model="fake-model", max_retries=0,
                     openai_api_key="test-key", tool_timeout_s=20.0)
    source = McpTools([entry])
    tools = default_registry(s)
    tools.add_source(source)
    async with fake_openai_server(
        StreamReply([], tool_calls=[FakeToolCall("fake__add", {"a": 2, "b": 40})]),
        StreamReply(["2 + 40 is 42."]),
        StreamReply([], tool_calls=[FakeToolCall("fake__slow", {"seconds": 60})]),
        StreamReply(["The tool failed."]),
        StreamReply([], tool_calls=[FakeToolCall("fake__add", {"a": 1, "b": 1})]),
        StreamReply(["1 + 1 is 2."]),
    ) as upstream:
        s = s.replace(openai_base_url=upstream.base_url)
        async with running_server(s, tools=tools) as server, server.websocket() as ws:
            await send(ws, {"message": "add 2 and 40"})
            first = await receive_until(ws, history)
            chat_id = first[0]["chat_id"]
            pid = int(pid_file.read_text())

            await send(ws, {"message": "take your time", "chat_id": chat_id})
            started = await receive_until(ws, lambda f: f["event"] == "tool_activity")
            await trio.sleep(0.3)  # the call (60 s of sleep) is on the server by now
            os.kill(pid, signal.SIGKILL)  # the server dies in mid-call
            second = started + await receive_until(ws, history)

            with trio.fail_after(15):  # it is started again, and its tools listed again
                while source.servers[0].connections < 2:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert int(pid_file.read_text()) != pid
            await send(ws, {"message": "add 1 and 1", "chat_id": chat_id})
            third = await receive_until(ws, history)

            async with server.client() as client:
                page = (await client.get(f"/chat/{chat_id}")).json()
                stats = (await client.get("/stats")).json()

    offered = [t["function"]["name"] for t in upstream.requests[0]["tools"]]
    assert {"calculator", "fake__add", "fake__slow", "fake__fail"} <= set(offered)

    assert [(t["tool"], t["status"]) for t in tool_frames(first)] == [
        ("fake__add", "started"), ("fake__add", "completed")
    ]
    assert tool_frames(first)[1]["result"] == {"result": 42}
    assert done_frame(first)["message"] == "2 + 40 is 42."

    failed = tool_frames(second)[-1]
    assert (failed["tool"], failed["status"]) == ("fake__slow", "failed")
    assert failed["error"] == "tool_failed: MCP server fake: Connection closed"
    assert failed["duration_ms"] >= 300
    told = upstream.requests[3]["messages"][-1]  # the model is told, and answers
    assert told["role"] == "tool" and "MCP server fake" in json.loads(told["content"])["error"]
    assert done_frame(second)["status"] == "complete"
    assert done_frame(second)["message"] == "The tool failed."

    assert tool_frames(third)[-1]["result"] == {"result": 2}
    assert done_frame(third)["message"] == "1 + 1 is 2."

    calls = [c for m in page["messages"] for c in m.get("tool_calls") or ()]
    assert [(c["tool"], c["arguments"], c["result"], c["error"] is None) for c in calls] == [
        ("fake__add", {"a": 2, "b": 40}, {"result": 42}, True),
        ("fake__slow", {"seconds": 60}, None, False),
        ("fake__add", {"a": 1, "b": 1}, {"result": 2}, True),
    ]
    assert stats["tools"]["fake__add"]["calls"] == 2
    assert (stats["tools"]["fake__slow"]["calls"], stats["tools"]["fake__slow"]["errors"]) == (
        1, 1
    )
