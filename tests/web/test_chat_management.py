"""Renaming and deleting chats (crypto-shredding), against the real server, on both stores.

The deletion test follows a chat holding a unique canary string through everything a user,
an operator and an attacker with the database files could look at: after ``DELETE`` and the
documented purge step (``eventchat purge``), the canary is in no answer, no frame, no
SQLite file (write-ahead logs included) and no ``pg_dump`` of the schema, and the chat's
audit chain still verifies.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import uuid
from functools import partial
from typing import Any

import psycopg
import trio

from app.audit_cli import verify
from app.config import Settings
from app.projections import rebuild, status
from app.projections.views import open_views
from app.storage.purge import purge

from .conftest import Server, receive_until, running_server, send, web_settings

UNKNOWN = "00000000-0000-4000-8000-000000000000"


async def test_patch_renames_and_refuses_bad_bodies(server: Server) -> None:
    async with server.client() as c:
        chat = (await c.post("/chat", json={})).json()
        url = f"/chat/{chat['id']}"
        r = await c.patch(url, json={"title": "Trip plans", "model": "offline",
                                     "system_prompt": "Answer in French."})
        assert r.status_code == 200, r.text
        assert r.json()["title"] == "Trip plans" and r.json()["model"] == "offline"
        assert (await c.get(url)).json()["chat"]["title"] == "Trip plans"
        assert [x["title"] for x in (await c.get("/chats")).json()["chats"]] == ["Trip plans"]
        events = (await c.get(f"{url}/events")).json()["events"]
        assert [e["type"] for e in events][-3:] == ["Renamed", "ModelChanged",
                                                    "SystemPromptChanged"]
        for body in ({"title": ""}, {"title": "   "}, {"title": None}, {"titel": "x"},
                     {"title": 5}, {"model": "no-such-model"}, {"title": "ok", "model": ""},
                     [1]):
            r = await c.patch(url, json=body)
            assert r.status_code == 400, (body, r.text)
            assert set(r.json()["error"]) == {"code", "message"}
        r = await c.patch(url, content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        assert len((await c.get(f"{url}/events")).json()["events"]) == len(events)
        assert (await c.get(url)).json()["chat"]["title"] == "Trip plans"
        r = await c.patch(f"/chat/{UNKNOWN}", json={"title": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "chat_not_found"
        assert (await c.delete(f"/chat/{UNKNOWN}")).status_code == 404
    async with server.client("bob") as c:  # another user's chat does not exist for bob
        for r in (await c.patch(url, json={"title": "mine"}), await c.delete(url)):
            assert r.status_code == 404 and r.json()["error"]["code"] == "chat_not_found"
    async with server.client() as c:
        assert (await c.get(url)).json()["chat"]["title"] == "Trip plans"


async def test_a_deleted_chat_is_nowhere(settings: Settings) -> None:
    canary = f"canary{uuid.uuid4().hex[:12]}"
    settings = web_settings(settings)
    async with running_server(settings) as server, server.client() as c:
        kept = (await c.post("/generate", json={"message": "keep this one"})).json()["chat_id"]
        chat_id = (await c.post("/generate", json={"message": f"remember {canary} please"})
                   ).json()["chat_id"]
        url = f"/chat/{chat_id}"
        r = await c.patch(url, json={"title": f"About {canary}",
                                     "system_prompt": f"Mention {canary}."})
        assert r.status_code == 200
        hits = (await c.get("/chats", params={"q": canary})).json()["chats"]
        assert [h["id"] for h in hits] == [chat_id]
        key = await trio.to_thread.run_sync(_stored_key, settings, chat_id)
        frames: list[dict[str, Any]] = []
        async with server.websocket() as follower, trio.open_nursery() as nursery:
            await send(follower, {"event": "subscribe", "chat_id": chat_id})
            await receive_until(follower, lambda f: f["event"] == "chat_history")
            nursery.start_soon(partial(c.post, "/generate",
                                       json={"message": f"/slow {canary}", "chat_id": chat_id}))
            frames += await receive_until(follower, lambda f: "delta" in f)  # it streams
            with trio.fail_after(10):
                r = await c.delete(url)  # stops the running response first
            assert r.status_code == 204 and r.content == b""
            frames += await receive_until(follower, lambda f: f["event"] == "error")
            assert frames[-1]["code"] == "chat_not_found"
            assert any(f.get("status") == "stopped" for f in frames)
            await send(follower, {"event": "subscribe", "chat_id": chat_id})
            await send(follower, {"event": "user_message", "chat_id": chat_id,
                                  "message": "still there?"})
            await send(follower, {"event": "stop", "chat_id": chat_id})
            refused = await receive_until(follower, _errors(3))
            assert [f["code"] for f in refused if f["event"] == "error"] == [
                "chat_not_found"] * 3

        answers = []
        for method, path in [("GET", url), ("GET", f"{url}/events"), ("GET", f"{url}/audit"),
                             ("GET", f"{url}/export"), ("PATCH", url), ("DELETE", url),
                             ("POST", f"{url}/stop"), ("GET", f"/stats?chat_id={chat_id}")]:
            body = {"title": "x"} if method == "PATCH" else None
            r = await c.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            answers.append(r.text)
        r = await c.post("/generate", json={"message": "hi", "chat_id": chat_id})
        assert r.status_code == 404
        listed = (await c.get("/chats")).json()["chats"]
        assert [x["id"] for x in listed] == [kept]
        assert (await c.get("/chats", params={"q": canary})).json()["chats"] == []
        stats = (await c.get("/stats")).json()
        assert stats["totals"]["chats"] == 1 and stats["totals"]["messages"] == 2
        answers += [json.dumps(listed), json.dumps(stats), (await c.get(f"/chat/{kept}")).text,
                    (await c.get(f"/chat/{kept}/events")).text]
        after = [frames[-1], *refused]  # the frames sent once the chat was deleted
        assert not [a for a in [*answers, *map(json.dumps, after)] if canary in a]

        # the documented step, while serving; then the database itself, write-ahead logs
        # included (pg_dump writes bytea as hex)
        await trio.to_thread.run_sync(purge, settings)
        stored = await trio.to_thread.run_sync(_database_bytes, settings)
        for secret in (canary.encode(), key, key.hex().encode()):
            assert secret not in stored

    # the operator's view: the chain still holds, the views rebuild without the chat
    assert await trio.to_thread.run_sync(verify, settings, [uuid.UUID(chat_id)], None) == 0
    assert await trio.to_thread.run_sync(rebuild, settings, False) > 0
    assert (await trio.to_thread.run_sync(status, settings))["skipped_events"] == 0
    assert await trio.to_thread.run_sync(_view_stats, settings) == stats["totals"]


def _errors(count: int) -> Any:
    seen: list[int] = []

    def enough(frame: dict[str, Any]) -> bool:
        seen.extend([1] if frame["event"] == "error" else [])
        return len(seen) >= count

    return enough


def _stored_key(settings: Settings, chat_id: str) -> bytes:
    if settings.database_url:
        with psycopg.connect(settings.database_url) as conn:
            row = conn.execute(f'SELECT data_key FROM "{settings.database_schema}".'
                               "eventchat_chat_keys WHERE chat_id = %s", (chat_id,)).fetchone()
    else:
        with sqlite3.connect(settings.data_dir / "events.sqlite") as conn:
            row = conn.execute("SELECT data_key FROM chat_keys WHERE chat_id = ?",
                               (chat_id,)).fetchone()
    assert row is not None and row[0] is not None
    return bytes(row[0])


def _view_stats(settings: Settings) -> dict[str, Any]:
    views = open_views(settings)
    try:
        return dict(views._stats("alice", None)["totals"])
    finally:
        views.close()


def _database_bytes(settings: Settings) -> bytes:
    """Every byte of the store: each file of the SQLite data dir, or a dump of the schema."""
    if not settings.database_url:
        files = sorted(p for p in settings.data_dir.iterdir() if p.is_file())
        assert {"events.sqlite", "views.sqlite"} <= {p.name for p in files}
        return b"\n".join(p.read_bytes() for p in files)
    return subprocess.run(
        ["/usr/bin/pg_dump", "--schema", settings.database_schema, settings.database_url],
        check=True, capture_output=True, timeout=60).stdout
