"""``eventchat audit`` and ``eventchat export`` run as a user would, on a tampered SQLite
data dir: exit statuses, the lines printed, one-line errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import trio

from app.config import Settings
from tests.events.tamper import EXPECTED, tampered_store


async def eventchat(*args: str, data_dir: Path, key: str | None = None) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTCHAT_", "OPENAI_"))}
    if key is not None:
        env["EVENTCHAT_AUDIT_KEY"] = key
    return await trio.run_process(
        [sys.executable, "-m", "app.cli", *args, "--data-dir", str(data_dir)],
        env=env, capture_stdout=True, capture_stderr=True, check=False)


async def test_audit_commands_and_export_from_the_shell(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    chats = await trio.to_thread.run_sync(tampered_store, Settings(data_dir=data_dir))

    verified = await eventchat("audit", "verify", data_dir=data_dir)
    assert verified.returncode == 1
    assert set(verified.stdout.decode().splitlines()) == {
        f"{chats[name]}: first invalid seq {seq} ({reason})"
        for name, (seq, reason) in EXPECTED.items()}

    unsigned = await eventchat("audit", "checkpoint", data_dir=data_dir)
    assert unsigned.returncode == 1 and unsigned.stdout == b""
    assert unsigned.stderr.decode() == ("eventchat: EVENTCHAT_AUDIT_KEY is not set: "
                                        "checkpoints are signed with it\n")
    signed = await eventchat("audit", "checkpoint", data_dir=data_dir, key="k")
    lines = [json.loads(line) for line in signed.stdout.decode().splitlines()]
    assert signed.returncode == 0 and lines[0]["algorithm"] == "HMAC-SHA256"
    assert {line["chat_id"] for line in lines[1:-1]} == {str(c) for c in chats.values()}
    assert lines[-1]["chats"] == len(chats) and len(lines[-1]["signature"]) == 64

    one = await eventchat("audit", "verify", str(chats["intact"]), data_dir=data_dir)
    assert (one.returncode, one.stdout) == (0, b"verified 1 chat: every chain holds\n")

    exported = await eventchat("export", str(chats["intact"]), data_dir=data_dir)
    records = [json.loads(line) for line in exported.stdout.decode().splitlines()]
    assert all(len(r["hash"]) == 64 and r["stored"]["state"] for r in records)
    unknown = await eventchat("export", "--format", "pdf", data_dir=data_dir)
    assert unknown.returncode == 2 and b"unknown --format 'pdf'" in unknown.stderr
