"""A real ``eventchat serve`` process and how it ends: SIGTERM lets a running reply finish for
the grace period and exits within 10 s in all; a second SIGTERM interrupts it at once
(recorded, text kept); a core task that fails makes the process exit with status 1 and one
line, rather than serve on half-alive."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from app.config import Settings
from tests.test_process_crash import eventchat, free_port, server_env, server_process, wait_healthy
from tests.web.conftest import close_transport

pytestmark = pytest.mark.slow

#: A reply of 3,000 tokens 10 ms apart: 30 s, far longer than the grace period.
LONG_REPLY = "/tokens 3000"
#: ``eventchat`` with a projection runner that fails on the first events after start-up.
FAILING_RUNNER = """
import sys
from app.projections.updater import ViewUpdater

catch_up = ViewUpdater.catch_up


async def failing_catch_up(self):
    read = await catch_up(self)
    if read and self.position > 0:
        raise RuntimeError("a bug in the projection runner")
    return read


ViewUpdater.catch_up = failing_catch_up
from app.cli import main
main(sys.argv[1:])
"""


@contextmanager
def logged_process(command: list[str], env: dict[str, str],
                   log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def add_user(env: dict[str, str]) -> str:
    added = await trio.run_process(eventchat("users", "add", "alice"), env=env,
                                   capture_stdout=True)
    return added.stdout.decode().strip().splitlines()[-1]


async def start_long_reply(ws: WebSocketConnection) -> tuple[str, str]:
    """Sends the long message; returns its chat and the text streamed once 60 characters
    have come."""
    await ws.send_message(json.dumps({"event": "user_message", "message": LONG_REPLY,
                                      "client_message_id": "m-1"}))
    streamed = ""
    with trio.fail_after(15):
        while len(streamed) < 60:
            frame = json.loads(await ws.get_message())
            if frame["event"] == "ack":
                chat_id = frame["chat_id"]
            elif frame["event"] == "ai_response" and not frame["done"]:
                streamed += frame["delta"]
    return chat_id, streamed


async def last_frames(ws: WebSocketConnection, limit_s: float) -> list[dict[str, Any]]:
    """Every frame until the server closes the connection."""
    frames = []
    with trio.fail_after(limit_s):
        try:
            while True:
                frames.append(json.loads(await ws.get_message()))
        except ConnectionClosed:
            await close_transport(ws)
            return frames


async def exited(process: subprocess.Popen[bytes], limit_s: float) -> int:
    with trio.fail_after(limit_s):
        while process.poll() is None:  # noqa: ASYNC110 - another process
            await trio.sleep(0.02)
    return process.returncode


async def recorded_reply(env: dict[str, str], port: int, log: Path, token: str,
                         chat_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The reply as stored, read back from a server started again on the same store."""
    with server_process(env, port, log) as process:
        base_url = f"http://127.0.0.1:{port}"
        await wait_healthy(base_url, process)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as c:
            page = (await c.get(f"/chat/{chat_id}")).json()
            events = (await c.get(f"/chat/{chat_id}/events")).json()["events"]
    return page["messages"][-1], events


async def test_a_second_sigterm_interrupts_the_reply_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    env = server_env(settings)
    token = await add_user(env)
    port, log = free_port(), tmp_path / "server.log"
    with server_process(env, port, log) as process:
        await wait_healthy(f"http://127.0.0.1:{port}", process)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/chat?access_token={token}"
                                      ) as ws:
            chat_id, streamed = await start_long_reply(ws)
            process.send_signal(signal.SIGTERM)
            await trio.sleep(1.0)
            assert process.poll() is None, "the first SIGTERM must let the reply go on"
            second = time.monotonic()
            process.send_signal(signal.SIGTERM)
            frames = await last_frames(ws, 5)
        code = await exited(process, 5)
        took = time.monotonic() - second
    print(f"exited {took:.2f} s after the second SIGTERM")
    assert code == 0 and took < 3.0
    done = [f for f in frames if f["event"] == "ai_response" and f["done"]]
    assert [f["status"] for f in done] == ["interrupted"]
    reply, events = await recorded_reply(env, port, log, token, chat_id)
    assert reply["status"] == "interrupted" and reply["content"].startswith(streamed)
    assert reply["content"] == done[0]["message"]
    assert events[-1]["type"] == "ResponseInterrupted"
    assert events[-1]["data"]["reason"] == "server_shutdown"


async def test_one_sigterm_ends_the_process_within_10_s(
    settings: Settings, tmp_path: Path
) -> None:
    env = server_env(settings)
    token = await add_user(env)
    port, log = free_port(), tmp_path / "server.log"
    with server_process(env, port, log) as process:
        await wait_healthy(f"http://127.0.0.1:{port}", process)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/chat?access_token={token}"
                                      ) as ws:
            chat_id, streamed = await start_long_reply(ws)
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            frames = await last_frames(ws, 12)
        code = await exited(process, 12)
        took = time.monotonic() - sent
    print(f"exited {took:.2f} s after SIGTERM")
    assert code == 0 and took < 10.0
    assert [f["status"] for f in frames if f["event"] == "ai_response" and f["done"]] == [
        "interrupted"]
    reply, events = await recorded_reply(env, port, log, token, chat_id)
    assert reply["status"] == "interrupted" and reply["content"].startswith(streamed)
    assert events[-1]["data"]["reason"] == "server_shutdown"


async def test_a_failed_core_task_makes_the_process_exit_with_status_1(
    settings: Settings, tmp_path: Path
) -> None:
    env = server_env(settings)
    token = await add_user(env)
    port, log = free_port(), tmp_path / "server.log"
    base_url = f"http://127.0.0.1:{port}"
    with logged_process([sys.executable, "-c", FAILING_RUNNER, "serve", "--port", str(port)],
                        env, log) as process:
        await wait_healthy(base_url, process)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as c:
            assert (await c.get("/health/live")).json() == {"status": "alive"}
            try:  # its events reach the runner, which fails on them
                await c.post("/generate", json={"message": "hello"})
            except httpx.TransportError:
                pass
        code = await exited(process, 10)
    lines = log.read_text().strip().splitlines()
    assert code == 1, lines[-20:]
    assert lines[-1] == ("eventchat: a core task failed: RuntimeError: a bug in the projection"
                         " runner; exiting"), lines[-20:]
