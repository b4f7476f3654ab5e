"""Tools from Model Context Protocol servers, over stdio or Streamable HTTP, through the
official ``mcp`` SDK (which runs on anyio, so under trio).

``McpTools`` is a tool source of the ``ToolRegistry``: the registry offers its tools to the
model beside the built-in ones, and its ``run`` (in the services' nursery) owns one
long-lived task per server, ``McpServer.run``. That task holds the server's session: it
connects (for stdio, it starts the server's process), lists the server's tools, and keeps
the session until it is lost; then it connects again with backoff (``BACKOFF_START_S``
doubling up to ``BACKOFF_MAX_S``) and lists the tools again. The list is also read again when
the server says it changed (``notifications/tools/list_changed``) and every
``check_interval_s``, which is how a session lost while idle is noticed. While a server is
away its last known tools stay offered, and calling them is a tool error.

The model sees each tool as ``<server>__<tool>`` (OpenAI-compatible function names allow only
letters, digits, ``_`` and ``-``; anything else becomes ``_``), and that is the name recorded
in ``ToolInvoked`` and counted in ``/stats``. A call goes through the session held by the
server's task. A server that is not connected, a lost connection, an error result
(``isError``) and an answer the SDK cannot read all raise ``ToolExecutionError`` with the
server's name; the registry's timeout bounds every call (``ToolTimeoutError``). None of it
ever ends a turn: the turn records ``ToolFailed`` and tells the model.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mcp_types as types
import trio
from mcp import Client, StdioServerParameters
from mcp.client.session import IncomingMessage
from mcp.client.stdio import get_default_environment
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from ..config import McpServer as McpServerConfig
from .base import ToolContext, ToolSpec
from .errors import ToolExecutionError
from .tools import ToolFunction

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
#: How long a server's first connection may hold up the start (its tools are then offered
#: from the first message); a server still connecting after it joins later.
START_TIMEOUT_S = 10.0
#: How often a connected server's tools are listed again (and its session so checked).
CHECK_INTERVAL_S = 30.0
#: Longest wait for a connection or a tool list before the attempt counts as failed.
CONNECT_TIMEOUT_S = 10.0
#: Characters of a tool's text result kept for the model and the log.
MAX_RESULT_CHARS = 20_000
_NOT_A_NAME = re.compile(r"[^A-Za-z0-9_-]")


def tool_name(server: str, tool: str) -> str:
    """The name the model sees (and the log records) for ``server``'s ``tool``."""
    return _NOT_A_NAME.sub("_", f"{server}__{tool}")[:64]


class McpServer:
    """One MCP server and its session, held by ``run``. ``tools`` maps the model's names to
    the specs and callables of the tools last listed; ``problem`` says why the server is
    not connected now (None when it is)."""

    def __init__(self, entry: McpServerConfig, *, check_interval_s: float = CHECK_INTERVAL_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.name = entry.name
        self._entry = entry
        self._check_interval_s = check_interval_s
        self._connect_timeout_s = connect_timeout_s
        self.tools: dict[str, tuple[ToolSpec, ToolFunction]] = {}
        self.problem: str | None = "not connected yet"
        self._client: Client | None = None
        self._check = trio.Event()
        #: Set once the first connection succeeded or failed.
        self.tried = trio.Event()
        #: Each successful connection, counted (a reconnection lists the tools again).
        self.connections = 0

    async def run(self) -> None:
        """Connects and keeps the session until cancelled, connecting again when it is lost;
        sets ``tried`` after the first attempt. Never raises but ``trio.Cancelled``."""
        backoff = BACKOFF_START_S
        while True:
            connections = self.connections
            try:
                await self._session()
            except Exception as exc:  # noqa: BLE001 - a foreign server: any failure is "away"
                self.problem = _reason(exc)
                if self.connections != connections:  # it was connected: try again soon
                    backoff = BACKOFF_START_S
                log.warning("MCP server %s: %s; connecting again in %g s",
                            self.name, self.problem, backoff)
            self.tried.set()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _session(self) -> None:
        """One session: connects and lists the tools (within ``connect_timeout_s``), then
        keeps them fresh until the session is lost (returns or raises)."""
        with trio.CancelScope(deadline=trio.current_time() + self._connect_timeout_s) as scope:
            async with Client(self._target(), message_handler=self._on_message,
                              cache=None) as client:
                self._check = trio.Event()
                await self._list(client)
                scope.deadline = math.inf
                self._client, self.problem = client, None
                self.connections += 1
                self.tried.set()
                log.info("MCP server %s: connected, %d tools", self.name, len(self.tools))
                try:
                    await self._keep(client)
                finally:
                    self._client = None
        if scope.cancelled_caught:
            raise trio.TooSlowError

    def _target(self) -> StdioServerParameters | str:
        if self._entry.url is not None:
            return self._entry.url
        command, *args = self._entry.command
        env = {**get_default_environment(), **dict(self._entry.env)}
        return StdioServerParameters(command=command, args=args, env=env)

    async def _keep(self, client: Client) -> None:
        """Lists the tools again every ``check_interval_s`` or when asked (a change, a
        transport error, a lost call); returns when that fails: the session is lost."""
        while True:
            with trio.move_on_after(self._check_interval_s):
                await self._check.wait()
            self._check = trio.Event()
            with trio.fail_after(self._connect_timeout_s):
                await self._list(client)  # a session lost is an error here

    async def _list(self, client: Client) -> None:
        listed: dict[str, tuple[ToolSpec, ToolFunction]] = {}
        cursor: str | None = None
        while True:
            page = await client.list_tools(cursor=cursor, cache_mode="refresh")
            for tool in page.tools:
                spec = ToolSpec(tool_name(self.name, tool.name),
                                f"[{self.name}] {tool.description or tool.name}",
                                tool.input_schema)
                listed[spec.name] = (spec, _Call(self, tool.name))
            cursor = page.next_cursor
            if cursor is None:
                break
        self.tools = listed

    async def _on_message(self, message: IncomingMessage) -> None:
        if isinstance(message, types.ToolListChangedNotification | Exception):
            self._check.set()
        await trio.lowlevel.checkpoint()

    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        """Calls ``tool`` on the server; raises ``ToolExecutionError`` (see the module)."""
        client = self._client
        if client is None:
            raise ToolExecutionError(f"MCP server {self.name} is not connected ({self.problem})")
        try:
            result = await client.call_tool(tool, arguments)
        except MCPError as exc:
            self._check.set()  # a lost connection is noticed at once, not at the next check
            raise ToolExecutionError(f"MCP server {self.name}: {exc}") from exc
        except (ValidationError, ValueError) as exc:
            raise ToolExecutionError(
                f"MCP server {self.name} sent an answer that is not a tool result"
            ) from exc
        if result.is_error:
            raise ToolExecutionError(f"{self.name}: {_text(result.content) or 'the tool failed'}")
        return _result(result)


@dataclass(frozen=True, slots=True)
class _Call:
    """The registry's callable for one tool of one server."""

    server: McpServer
    tool: str

    async def __call__(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        return await self.server.call(self.tool, arguments)


class McpTools:
    """The tools of every configured MCP server, as one source of the ``ToolRegistry``."""

    def __init__(self, entries: Sequence[McpServerConfig], *,
                 check_interval_s: float = CHECK_INTERVAL_S,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.servers = [McpServer(entry, check_interval_s=check_interval_s) for entry in entries]
        self._start_timeout_s = start_timeout_s

    def tools(self) -> Mapping[str, tuple[ToolSpec, ToolFunction]]:
        return {name: tool for server in self.servers for name, tool in server.tools.items()}

    def problems(self) -> list[str]:
        return [f"MCP server {s.name}: {s.problem}" for s in self.servers if s.problem]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs every server's session until cancelled; reports started once each server
        made its first attempt, or after ``start_timeout_s``, whichever comes first."""
        async with trio.open_nursery() as nursery:
            for server in self.servers:
                nursery.start_soon(server.run)
            with trio.move_on_after(self._start_timeout_s):
                for server in self.servers:
                    await server.tried.wait()
            task_status.started()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _reason(exc.exceptions[0])
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _text(content: Sequence[types.ContentBlock]) -> str:
    texts = [block.text for block in content if isinstance(block, types.TextContent)]
    return "\n".join(texts)[:MAX_RESULT_CHARS]


def _result(result: types.CallToolResult) -> Any:
    """What the model and the log get: the structured result when there is one, else the
    text (other content blocks are named by type, not copied)."""
    if result.structured_content is not None:
        return result.structured_content
    others = [block.type for block in result.content if not isinstance(block, types.TextContent)]
    text = _text(result.content)
    return {"text": text, "other_content": others} if others else text
