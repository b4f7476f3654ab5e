"""Tools from MCP servers through the registry, against a real MCP server process (the SDK's,
``tests/fakes/mcp_server.py``) over Streamable HTTP: started once for the module."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from app.config import McpServer, Settings
from app.llm.base import ToolContext
from app.llm.errors import ToolExecutionError, ToolTimeoutError, UnknownToolError
from app.llm.mcp import McpTools, tool_name
from app.llm.tools import ToolRegistry, default_registry

FAKE_SERVER = Path(__file__).resolve().parent.parent / "fakes" / "mcp_server.py"
CONTEXT = ToolContext(owner="alice", chat_id="chat-1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def mcp_url() -> Iterator[str]:
    """The fake MCP server over Streamable HTTP, one process for the module."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--http", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "no MCP server"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)


@asynccontextmanager
async def registry_with(*entries: McpServer, timeout_s: float = 5.0,
                        **options: float) -> AsyncIterator[tuple[ToolRegistry, McpTools]]:
    registry = ToolRegistry(timeout_s=timeout_s)
    source = McpTools(entries, **options)
    registry.add_source(source)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            await nursery.start(registry.run)
        yield registry, source
        nursery.cancel_scope.cancel()


async def test_tools_are_listed_with_their_server_and_called(mcp_url: str) -> None:
    async with registry_with(McpServer("fake", url=mcp_url), timeout_s=0.5) as (
        registry, source
    ):
        names = {spec.name for spec in registry.specs()}
        assert {"fake__add", "fake__slow", "fake__fail"} <= names
        spec = next(s for s in registry.specs() if s.name == "fake__add")
        assert spec.description.startswith("[fake] Adds two integers")
        assert spec.parameters["required"] == ["a", "b"]

        assert await registry.call("fake__add", json.dumps({"a": 2, "b": 40}), CONTEXT) == {
            "result": 42
        }
        with pytest.raises(ToolExecutionError, match="fake: .*out of paper"):
            await registry.call("fake__fail", json.dumps({"reason": "out of paper"}), CONTEXT)
        started = trio.current_time()
        with pytest.raises(ToolTimeoutError, match="fake__slow did not finish within 0.5 s"):
            await registry.call("fake__slow", json.dumps({"seconds": 30}), CONTEXT)
        assert trio.current_time() - started < 2
        # the session outlives a call given up on: the next one is answered
        assert await registry.call("fake__add", '{"a": 1, "b": 1}', CONTEXT) == {"result": 2}
        assert source.servers[0].connections == 1 and source.problems() == []


async def test_a_server_that_is_down_or_not_mcp_gives_tool_errors_not_crashes(
    mcp_url: str
) -> None:
    down = McpServer("down", url=f"http://127.0.0.1:{free_port()}/mcp")
    web_page = McpServer("page", url=mcp_url.replace("/mcp", "/not-mcp"))
    missing = McpServer("gone", command=(sys.executable, "/nonexistent/server.py"))
    async with registry_with(down, web_page, missing, start_timeout_s=10.0) as (
        registry, source
    ):
        assert registry.specs() == ()
        problems = source.problems()
        assert [p.split(":")[0] for p in problems] == [
            "MCP server down", "MCP server page", "MCP server gone"
        ]
        with pytest.raises(UnknownToolError):
            await registry.call("down__add", "{}", CONTEXT)
        with pytest.raises(ToolExecutionError, match="MCP server down is not connected"):
            await source.servers[0].call("add", {"a": 1, "b": 2})


def test_tool_names_keep_to_what_openai_accepts() -> None:
    assert tool_name("fs", "read_file") == "fs__read_file"
    assert tool_name("my server", "get.weather/now") == "my_server__get_weather_now"
    assert len(tool_name("s" * 40, "t" * 40)) == 64


async def test_the_configured_servers_are_a_source_of_the_default_registry(
    mcp_url: str
) -> None:
    settings = Settings(tool_timeout_s=3.0, mcp_servers=(McpServer("fake", url=mcp_url),))
    registry = default_registry(settings)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            await nursery.start(registry.run)
        assert {"calculator", "fake__add"} <= {spec.name for spec in registry.specs()}
        assert await registry.call("fake__add", '{"a": 3, "b": 4}', CONTEXT) == {"result": 7}
        nursery.cancel_scope.cancel()
    assert default_registry(Settings()).sources == []
