"""A real ``eventchat serve`` process killed with SIGKILL in mid-stream, then restarted.

After the restart the chat shows the acknowledged user message exactly once and the response
as ``interrupted`` with the text it had persisted, all the client saw included (guarantees 1,
7 and 8 of the contract).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from app.config import Settings

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTCHAT_", "OPENAI_"))}
    env.update(
        EVENTCHAT_DATA_DIR=str(settings.data_dir),
        EVENTCHAT_PROVIDER="offline",
        EVENTCHAT_OFFLINE_TOKEN_DELAY_S="0.01",
        EVENTCHAT_TOKEN_FLUSH_MS="20",
        PYTHONUNBUFFERED="1",
    )
    if settings.database_url:
        env.update(
            EVENTCHAT_DATABASE_URL=settings.database_url,
            EVENTCHAT_DATABASE_SCHEMA=settings.database_schema,
        )
    return env


def eventchat(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


@contextmanager
def server_process(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        process = subprocess.Popen(
            eventchat("serve", "--port", str(port)), env=env, stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def wait_healthy(base_url: str, process: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        with trio.fail_after(30):
            while True:
                assert process.poll() is None, "the server exited"
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)


async def test_sigkill_mid_stream_keeps_the_message_and_interrupts_the_response(
    settings: Settings, tmp_path: Path
) -> None:
    env = server_env(settings)
    added = await trio.run_process(eventchat("users", "add", "alice"), env=env, capture_stdout=True)
    token = added.stdout.decode().strip().splitlines()[-1]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    ws_url = f"ws://127.0.0.1:{port}/ws/chat?access_token={token}"
    log = tmp_path / "server.log"

    streamed = ""
    with server_process(env, port, log) as process:
        await wait_healthy(base_url, process)
        async with open_websocket_url(ws_url) as ws:
            await ws.send_message(
                json.dumps(
                    {"event": "user_message", "message": "/slow", "client_message_id": "m-1"}
                )
            )
            with trio.fail_after(15):
                while len(streamed) < 60:
                    frame = json.loads(await ws.get_message())
                    if frame["event"] == "ack":
                        chat_id, acked_seq = frame["chat_id"], frame["seq"]
                    elif frame["event"] == "ai_response" and not frame["done"]:
                        assert frame["offset"] == len(streamed)
                        streamed += frame["delta"]
            process.send_signal(signal.SIGKILL)  # at once: what was shown is in the log
            process.wait(timeout=10)

    with server_process(env, port, log) as process:
        await wait_healthy(base_url, process)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as client:
            with trio.fail_after(15):
                while True:
                    page = (await client.get(f"/chat/{chat_id}")).json()
                    if page["messages"] and page["messages"][-1]["status"] == "interrupted":
                        break
                    await trio.sleep(0.1)
            users = [m for m in page["messages"] if m["role"] == "user"]
            assert [(m["content"], m["seq"], m["client_message_id"]) for m in users] == [
                ("/slow", acked_seq, "m-1")
            ]
            reply = page["messages"][-1]
            assert reply["role"] == "assistant"
            # everything streamed had reached the log before it was sent (guarantee 8)
            assert reply["content"].startswith(streamed)
            assert len(reply["content"]) < 200 * 8  # /slow was cut short: not the whole reply
            events = (await client.get(f"/chat/{chat_id}/events")).json()["events"]
            types = [e["type"] for e in events]
            assert types.count("MessageReceived") == 1
            assert types[-1] == "ResponseInterrupted"
            assert events[-1]["data"]["reason"] == "server_restarted"
            # the chat goes on after the crash
            answer = await client.post(
                "/generate", json={"message": "still there?", "chat_id": chat_id}
            )
            assert answer.status_code == 200 and answer.json()["message"]["status"] == "complete"
