"""A real MCP server for tests, written with the official SDK: over stdio (the default) or
Streamable HTTP (``--http PORT``).

Its tools: ``add`` (two integers), ``slow`` (sleeps ``seconds``, then says so) and ``fail``
(an error result with the reason given). With ``--pid-file PATH`` it writes its process id
there once it runs, so that a test can kill it.

    python tests/fakes/mcp_server.py [--http PORT] [--pid-file PATH]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("fake-tools")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
async def slow(seconds: float) -> str:
    """Waits ``seconds``, then answers."""
    await anyio.sleep(seconds)
    return f"slept {seconds:g} s"


@server.tool()
def fail(reason: str) -> str:
    """Always fails, with ``reason``."""
    raise ToolError(reason)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, default=None, metavar="PORT")
    parser.add_argument("--pid-file", type=Path, default=None)
    args = parser.parse_args()
    if args.pid_file is not None:
        args.pid_file.write_text(str(os.getpid()))
    if args.http is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.http)


if __name__ == "__main__":
    main()
