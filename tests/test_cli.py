"""The ``eventchat`` command, run as a user would: users (add, list, revoke), replay, export,
projections."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import trio

from app.config import Settings
from app.events.application import ChatApplication, persistence_env
from app.events.domain import ChatSession
from app.web.users import UserStore, hash_token


async def run_eventchat(*args: str, data_dir: Path, check: bool = True) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTCHAT_", "OPENAI_"))}
    return await trio.run_process(
        [sys.executable, "-m", "app.cli", *args, "--data-dir", str(data_dir)],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=check,
    )


async def eventchat(*args: str, data_dir: Path) -> str:
    return str((await run_eventchat(*args, data_dir=data_dir)).stdout.decode())


def recorded_chat(data_dir: Path) -> ChatSession:
    settings = Settings(data_dir=data_dir)
    app = ChatApplication(env=persistence_env(settings))
    chat = ChatSession.start("alice", "sums")
    chat.receive_message("what is 12*7", "c-1")
    rid = chat.start_response("offline", "offline")
    chat.invoke_tool(rid, "call-1", "calculator", {"expression": "12*7"})
    chat.complete_tool(rid, "call-1", 84, 0.2)
    chat.record_tokens(rid, "12*7 = 84.", 6)
    chat.complete_response(rid, "offline", "stop", {"total_tokens": 6}, {"ttft_ms": 1.0})
    app.save(chat)
    app.close()
    return chat


async def test_users_add_prints_the_token_last(tmp_path: Path) -> None:
    out = await eventchat("users", "add", "carol", data_dir=tmp_path)
    token = out.strip().splitlines()[-1]
    assert len(token) >= 32 and " " not in token


async def test_replay_shows_the_log_and_the_chat_at_any_seq(tmp_path: Path) -> None:
    chat = await trio.to_thread.run_sync(recorded_chat, tmp_path)
    out = await eventchat("replay", str(chat.id), data_dir=tmp_path)
    lines = out.splitlines()
    assert "MessageReceived" in lines[1] and "what is 12*7" in lines[1]
    assert "ToolInvoked" in lines[3] and "calculator" in lines[3]
    assert "ToolCompleted" in lines[4] and "84" in lines[4]
    assert "ResponseCompleted" in lines[6]
    assert "  [2] user: what is 12*7" in lines and "  [7] assistant: 12*7 = 84." in lines

    earlier = await eventchat("replay", str(chat.id), "--until-seq", "5", data_dir=tmp_path)
    assert "ResponseCompleted" not in earlier
    assert "waiting for an answer" not in earlier and "[streaming" in earlier

    as_json = await eventchat("replay", str(chat.id), "--json", data_dir=tmp_path)
    records = [json.loads(line) for line in as_json.splitlines()]
    assert [r["seq"] for r in records] == list(range(1, 8))
    assert records[4]["data"]["result"] == 84


async def test_export_writes_every_chat_as_json_lines(tmp_path: Path) -> None:
    first = await trio.to_thread.run_sync(recorded_chat, tmp_path)
    second = await trio.to_thread.run_sync(recorded_chat, tmp_path)
    out = await eventchat("export", data_dir=tmp_path)
    records = [json.loads(line) for line in out.splitlines()]
    assert {r["chat_id"] for r in records} == {str(first.id), str(second.id)}
    assert len(records) == 14 and records[0]["type"] == "Started"


async def test_projections_rebuild_and_status(tmp_path: Path) -> None:
    await trio.to_thread.run_sync(recorded_chat, tmp_path)
    rebuilt = await eventchat("projections", "rebuild", data_dir=tmp_path)
    assert "from 7 events" in rebuilt
    status = json.loads(await eventchat("projections", "status", data_dir=tmp_path))
    assert status["position"] == status["max_position"] == 7 and status["lag"] == 0


async def test_users_list_and_revoke(tmp_path: Path) -> None:
    tokens = [(await eventchat("users", "add", name, data_dir=tmp_path)).split()[-1]
              for name in ("carol", "carol", "dave")]
    listed = await eventchat("users", "list", data_dir=tmp_path)
    rows = [line.split() for line in listed.splitlines()[1:]]
    assert [row[0] for row in rows] == ["carol", "carol", "dave"]
    assert {row[1] for row in rows} == {hash_token(t)[:8] for t in tokens}
    assert all(token not in listed and hash_token(token) not in listed for token in tokens)

    out = await eventchat("users", "revoke", "carol", "--id", hash_token(tokens[1])[:8],
                          data_dir=tmp_path)
    assert "Revoked 1 token of user 'carol'" in out
    users = UserStore(Settings(data_dir=tmp_path))
    assert users.authenticate(tokens[1]) is None and users.authenticate(tokens[0]) == "carol"
    assert "Revoked 1 token" in await eventchat("users", "revoke", "carol", data_dir=tmp_path)
    left = await eventchat("users", "list", data_dir=tmp_path)
    assert "carol" not in left and "dave" in left

    again = await run_eventchat("users", "revoke", "carol", data_dir=tmp_path, check=False)
    assert again.returncode == 1 and b"no token of user 'carol'" in again.stderr
