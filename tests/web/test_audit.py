"""The audit trail through a real server: ``/audit`` on a tampered store, ``"hash"`` on
``/events``, the JSON Lines export, checked by the stand-alone docs/verify_chain.py."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import trio

from app.config import Settings
from tests.events.tamper import EVENTS, EXPECTED, Tamper, tampered_store

from .conftest import running_server, web_settings

SCRIPT = Path(__file__).parents[2] / "docs" / "verify_chain.py"


async def run_script(export: Path) -> tuple[int, str]:
    done = await trio.run_process([sys.executable, "-I", str(SCRIPT), str(export)],
                                  capture_stdout=True, check=False)
    return done.returncode, done.stdout.decode()


async def test_audit_events_and_export_of_a_tampered_store(
    settings: Settings, tmp_path: Path
) -> None:
    chats = await trio.to_thread.run_sync(tampered_store, settings)
    heads = {chat: digest for chat, seq, digest in Tamper(settings).links() if seq == EVENTS}
    async with running_server(web_settings(settings)) as server, server.client() as c:
        for name, (seq, reason) in EXPECTED.items():
            chat_id = str(chats[name])
            answer = await c.get(f"/chat/{chat_id}/audit")
            key = chat_id if settings.database_url else chats[name].hex
            assert answer.status_code == 200 and answer.json() == {
                "chat_id": chat_id, "head_seq": EVENTS, "head_hash": heads[key].hex(),
                "valid": False, "first_invalid_seq": seq, "reason": reason}

        intact = str(chats["intact"])
        turn = await c.post("/generate", json={"message": "what is 2+3", "chat_id": intact})
        assert turn.status_code == 200
        events = (await c.get(f"/chat/{intact}/events")).json()["events"]
        assert len(events) > EVENTS and all(len(e["hash"]) == 64 for e in events)
        audit = (await c.get(f"/chat/{intact}/audit")).json()
        assert audit == {"chat_id": intact, "head_seq": len(events),
                         "head_hash": events[-1]["hash"], "valid": True,
                         "first_invalid_seq": None, "reason": None}

        export = await c.get(f"/chat/{intact}/export", params={"format": "jsonl"})
        assert export.status_code == 200
        assert export.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in export.text.splitlines()]
        assert [(e["seq"], e["hash"]) for e in lines] == [(e["seq"], e["hash"]) for e in events]
        assert lines[1]["data"]["text"] == "what is 12*7 (intact)" and lines[1]["stored"]

        unknown = await c.get(f"/chat/{intact}/export", params={"format": "pdf"})
        assert unknown.status_code == 400
        assert unknown.json()["error"]["code"] == "unknown_format"

        async with server.client("bob") as stranger:
            for path in ("audit", "export?format=jsonl"):
                refused = await stranger.get(f"/chat/{intact}/{path}")
                assert refused.status_code == 404
                assert refused.json()["error"]["code"] == "chat_not_found"

    # an auditor checks the export without eventchat
    exported = tmp_path / "chat.jsonl"
    exported.write_text(export.text)
    code, out = await run_script(exported)
    assert (code, out) == (0, f"{intact}: valid, head seq {len(events)} hash "
                              f"{audit['head_hash']}\n")
    stored = bytearray(base64.b64decode(lines[3]["stored"]["state"]))
    stored[len(stored) // 2] ^= 0x01
    lines[3]["stored"]["state"] = base64.b64encode(stored).decode()
    exported.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert await run_script(exported) == (1, f"{intact}: first invalid seq 4 (modified)\n")
    exported.write_text("".join(json.dumps(line) + "\n" for line in lines[:2] + lines[3:]))
    assert await run_script(exported) == (1, f"{intact}: first invalid seq 3 (missing)\n")
