"""The ``eventchat`` command, run as a user would: users (add, list, revoke), replay, export,
projections."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from app.config import Settings
from app.events.application import ChatApplication
from app.events.domain import ChatSession
from app.events.replay import chat_events
from app.replay_cli import replay_live
from app.storage.recorder import persistence_env
from app.storage.users import UserStore, hash_token


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
    assert token.startswith("ec_")  # never "-...", which a command line reads as an option


async def test_replay_shows_the_log_and_the_chat_at_any_seq(tmp_path: Path) -> None:
    chat = await trio.to_thread.run_sync(recorded_chat, tmp_path)
    out = await eventchat("replay", str(chat.id), data_dir=tmp_path)
    lines = out.splitlines()
    assert "MessageReceived" in lines[1] and "what is 12*7" in lines[1]
    assert "ToolInvoked" in lines[3] and "calculator" in lines[3]
    assert "ToolCompleted" in lines[4] and "84" in lines[4]
    assert "ResponseCompleted" in lines[6]
    # (a reply is numbered by its ResponseStarted, as in GET /chat/{id})
    assert "  [2] user: what is 12*7" in lines and "  [3] assistant: 12*7 = 84." in lines

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


# -- errors: one line and an exit status, never a traceback -------------------------------------

def one_line(done: Any) -> str:
    err = done.stderr.decode()
    assert "Traceback" not in err, err
    assert err.count("\n") == 1, err
    return err


async def test_serve_checks_the_port_before_creating_anything(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = await run_eventchat("serve", "--port", str(port), data_dir=tmp_path / "data",
                                   check=False)
    assert done.returncode == 1
    assert one_line(done).startswith(f"eventchat: cannot listen on 127.0.0.1:{port}: address "
                                     "already in use (another server? --port chooses another)")
    assert done.stdout == b"" and not (tmp_path / "data").exists()  # no user 'local' made


async def test_replay_until_seq_0_is_before_the_chat(tmp_path: Path) -> None:
    chat = await trio.to_thread.run_sync(recorded_chat, tmp_path)
    out = await eventchat("replay", str(chat.id), "--until-seq", "0", data_dir=tmp_path)
    assert out == f"chat {chat.id} at seq 0: not created yet (its first event, seq 1, creates it)\n"
    done = await run_eventchat("replay", str(chat.id), "--until-seq", "-1", data_dir=tmp_path,
                               check=False)
    assert done.returncode == 2 and "--until-seq counts events" in one_line(done)


@pytest.mark.parametrize("command", [
    ["replay", "3fa85f64-5717-4562-b3fc-2c963f66afa6"], ["export"], ["projections", "status"],
    ["projections", "rebuild"], ["users", "list"], ["users", "revoke", "carol"],
])
async def test_read_commands_refuse_a_data_dir_that_does_not_exist(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "dta"
    done = await run_eventchat(*command, data_dir=missing, check=False)
    assert done.returncode == 2
    assert one_line(done).startswith(f"eventchat: no data dir {missing}")
    assert not missing.exists()


async def test_a_directory_that_is_not_a_data_dir_is_refused(tmp_path: Path) -> None:
    done = await run_eventchat("export", data_dir=tmp_path, check=False)
    assert done.returncode == 2 and "is not an eventchat data dir" in one_line(done)
    assert os.listdir(tmp_path) == []


async def test_projections_rebuild_refuses_while_a_server_holds_the_data_dir(
    tmp_path: Path
) -> None:
    from app.actors.system import claim_data_dir

    await trio.to_thread.run_sync(recorded_chat, tmp_path)
    lock = claim_data_dir(tmp_path)  # as a running server holds it
    try:
        done = await run_eventchat("projections", "rebuild", data_dir=tmp_path, check=False)
    finally:
        lock.close()
    assert done.returncode == 1
    assert one_line(done) == (f"eventchat: a server is using {tmp_path}: stop it before "
                              "rebuilding the views\n")
    assert "from 7 events" in await eventchat("projections", "rebuild", data_dir=tmp_path)


@pytest.mark.postgres
async def test_projections_rebuild_refuses_while_a_server_listens_on_postgres(
    tmp_path: Path, pg_url: str, pg_schema: str
) -> None:
    import psycopg
    from psycopg import sql

    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTCHAT_", "OPENAI_"))}
    env["EVENTCHAT_DATABASE_SCHEMA"] = pg_schema
    argv = [sys.executable, "-m", "app.cli", "projections", "rebuild", "--database-url", pg_url]
    # what a running server holds: its live channel's LISTEN connection
    name = f"eventchat-listen:{pg_schema}"
    with psycopg.connect(pg_url, autocommit=True, application_name=name) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"eventchat_{pg_schema}")))
        done = await trio.run_process(argv, env=env, capture_stdout=True, capture_stderr=True,
                                      check=False)
    assert done.returncode == 1
    assert one_line(done) == (f"eventchat: 1 eventchat server uses this database (schema "
                              f"{pg_schema}): stop them before rebuilding\n")
    done = await trio.run_process(argv, env=env, capture_stdout=True, capture_stderr=True)
    assert b"rebuilt every view from 0 events" in done.stdout


async def test_an_os_error_is_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = await run_eventchat("users", "add", "bob", data_dir=not_a_dir, check=False)
    assert done.returncode == 1 and one_line(done).startswith("eventchat: ")


async def test_chat_with_a_url_that_is_not_a_websocket_one(tmp_path: Path) -> None:
    done = await run_eventchat("chat", "--token", "t", "--url", "gopher://x", data_dir=tmp_path,
                               check=False)
    assert done.returncode == 2 and "is not a WebSocket URL" in one_line(done)


def test_every_option_says_what_it_is_for() -> None:
    import argparse

    from app.bench.options import parser as bench_parser
    from app.bench.options import projections_parser
    from app.cli import _parser

    def undocumented(parser: argparse.ArgumentParser) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += [f"{name} {m}" for m in undocumented(sub)]
            elif not action.help:
                missing.append("/".join(action.option_strings) or action.dest)
        return missing

    for parser in (_parser(), bench_parser(), projections_parser()):
        assert undocumented(parser) == []


def deleted_chat(data_dir: Path) -> ChatSession:
    """A recorded chat, deleted as ``DELETE /chat/{id}`` deletes it (its key destroyed)."""
    chat = recorded_chat(data_dir)
    app = ChatApplication(env=persistence_env(Settings(data_dir=data_dir)))
    try:
        loaded = app.get_chat(chat.id)
        loaded.delete("alice")
        app.save(loaded)
        app.destroy_key(chat.id)
    finally:
        app.close()
    return chat


async def test_export_passes_over_deleted_chats_and_purge_runs(tmp_path: Path) -> None:
    kept = await trio.to_thread.run_sync(recorded_chat, tmp_path)
    gone = await trio.to_thread.run_sync(deleted_chat, tmp_path)
    out = await eventchat("export", data_dir=tmp_path)
    assert {json.loads(line)["chat_id"] for line in out.splitlines()} == {str(kept.id)}
    refused = await run_eventchat("export", str(gone.id), data_dir=tmp_path, check=False)
    assert refused.returncode == 1 and b"chat not found" in refused.stderr
    await eventchat("projections", "rebuild", data_dir=tmp_path)  # the views exist too
    purged = await eventchat("purge", data_dir=tmp_path)
    assert [line.split(":")[0] for line in purged.splitlines()] == [
        str(tmp_path / "views.sqlite"), str(tmp_path / "events.sqlite")]
    assert all("rebuilt, log truncated" in line for line in purged.splitlines())


def paced_chat(data_dir: Path) -> ChatSession:
    """A chat whose reply streamed in two chunks, 0.6 s apart."""
    settings = Settings(data_dir=data_dir)
    app = ChatApplication(env=persistence_env(settings))
    chat = ChatSession.start("alice", "paced")
    chat.receive_message("what is 12*7", "c-1")
    rid = chat.start_response("offline", "offline")
    chat.invoke_tool(rid, "call-1", "calculator", {"expression": "12*7"})
    chat.complete_tool(rid, "call-1", 84, 0.2)
    chat.record_tokens(rid, "12*7 = 84.", 6, chunks=[(5, 0), (5, 600)])
    chat.complete_response(rid, "offline", "stop", {"total_tokens": 6}, {"ttft_ms": 1.0})
    app.save(chat)
    app.close()
    return chat


class Timed(io.StringIO):
    """A text stream that notes when each write came."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return super().write(text)


async def test_replay_live_prints_the_chat_as_it_streamed_and_export_formats(
    tmp_path: Path,
) -> None:
    chat = await trio.to_thread.run_sync(paced_chat, tmp_path)
    app = ChatApplication(env=persistence_env(Settings(data_dir=tmp_path)))
    try:
        events = chat_events(app, chat.id)
    finally:
        app.close()
    out = Timed()
    await trio.to_thread.run_sync(replay_live, events, 2.0, out)
    texts = [text for _, text in out.writes]
    first, second = texts.index("12*7 "), texts.index("= 84.")
    assert 'tool calculator({"expression": "12*7"}) -> 84' in "".join(texts[:first])
    assert 0.25 <= out.writes[second][0] - out.writes[first][0] < 0.45  # 0.6 s at speed 2

    live = await eventchat("replay", str(chat.id), "--live", "--speed", "0", data_dir=tmp_path)
    assert live == out.getvalue()
    refused = await run_eventchat("replay", str(chat.id), "--live", "--speed", "-1",
                                  data_dir=tmp_path, check=False)
    assert refused.returncode == 2 and b"--speed" in refused.stderr
    exported = json.loads(await eventchat("export", str(chat.id), "--format", "openai",
                                          data_dir=tmp_path))
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant", "tool",
                                                         "assistant"]
    assert exported["messages"][-1]["content"] == "12*7 = 84."


def test_replay_live_shows_edits_regenerates_and_branch_switches(tmp_path: Path) -> None:
    chat = ChatSession.start("alice", "branches")
    first = chat.receive_message("first question")
    rid = chat.start_response("offline", "offline")
    chat.record_tokens(rid, "first answer", 2)
    chat.complete_response(rid, "offline", "stop", {"total_tokens": 2}, {"ttft_ms": 1.0})
    edit = chat.receive_message("better question", None, edit_of=first)
    rid = chat.start_response("offline", "offline")
    chat.record_tokens(rid, "better answer", 2)
    chat.complete_response(rid, "offline", "stop", {"total_tokens": 2}, {"ttft_ms": 1.0})
    chat.regenerate(first + 1, None)
    rid = chat.start_response("offline", "offline")
    chat.stop_response(rid, {"total_tokens": 0}, {"ttft_ms": None})
    chat.select_branch(edit)
    out = io.StringIO()
    replay_live(cast(list[ChatSession.Event], chat.collect_events()), 0, out)
    text = out.getvalue()
    assert text.startswith(f"chat {chat.id}: 'branches'")
    assert f"user (an edit of [{first}]): better question" in text
    assert f"regenerate: [{first}] answered again" in text and "stopped" in text
    assert f"branch through [{edit}] selected" in text
