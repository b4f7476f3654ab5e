"""``eventchat chat``: a terminal client over the WebSocket contract.

Reads lines from standard input, sends each as a ``user_message`` and prints the reply as it
streams. Lines starting with ``/stop`` stop the running response; ``/quit`` leaves. The
connection follows the chat it created (or ``--chat-id``), so replies to other tabs show too.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any
from urllib.parse import urlencode

import trio
from trio_websocket import ConnectionClosed, open_websocket_url


async def run_terminal_chat(url: str, token: str, chat_id: str | None = None) -> None:
    full_url = f"{url}{'&' if '?' in url else '?'}{urlencode({'access_token': token})}"
    state: dict[str, Any] = {"chat_id": chat_id}
    async with open_websocket_url(full_url) as ws:
        if chat_id:
            await ws.send_message(json.dumps({"event": "subscribe", "chat_id": chat_id}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_print_frames, ws, state, nursery.cancel_scope)
            await _send_lines(ws, state)
            nursery.cancel_scope.cancel()


async def _send_lines(ws: Any, state: dict[str, Any]) -> None:
    stdin = trio.wrap_file(sys.stdin)
    while True:
        line = await stdin.readline()
        if not line or line.strip() == "/quit":
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/stop":
            if state["chat_id"]:
                await ws.send_message(json.dumps({"event": "stop", "chat_id": state["chat_id"]}))
            continue
        frame: dict[str, Any] = {
            "event": "user_message",
            "message": text,
            "client_message_id": uuid.uuid4().hex,
        }
        if state["chat_id"]:
            frame["chat_id"] = state["chat_id"]
        await ws.send_message(json.dumps(frame))


async def _print_frames(ws: Any, state: dict[str, Any], scope: trio.CancelScope) -> None:
    try:
        while True:
            frame = json.loads(await ws.get_message())
            _show(frame, state)
    except ConnectionClosed as exc:
        print(f"\n[connection closed: {exc.reason}]", file=sys.stderr)
        scope.cancel()


def _show(frame: dict[str, Any], state: dict[str, Any]) -> None:
    event = frame.get("event")
    if event == "ack":
        state["chat_id"] = frame["chat_id"]
    elif event == "ai_response" and not frame.get("done"):
        print(frame["delta"], end="", flush=True)
    elif event == "ai_response":
        print(f"\n[{frame['status']}]" if frame["status"] != "complete" else "", flush=True)
    elif event == "tool_activity" and frame["status"] != "started":
        shown = frame.get("result") if frame["status"] == "completed" else frame.get("error")
        print(f"\n[{frame['tool']}: {shown}]", flush=True)
    elif event == "backend_status":
        print(
            f"[{frame['model']}: {frame['tokens_used']} tokens, "
            f"ttft {frame['ttft_ms']} ms, {frame['tokens_per_second']} tok/s]",
            file=sys.stderr,
        )
    elif event == "error":
        print(f"[error {frame['code']}: {frame['message']}]", file=sys.stderr)
