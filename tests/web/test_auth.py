"""Every endpoint without a token, with a wrong one, and with another user's; listing and
revoking tokens, and a revoked token refused by a running server."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import trio

from app.config import Settings
from app.storage.users import UserStore, add_user, ensure_default_user, hash_token
from app.web.users import TOKEN_CACHE_S, Authenticator

from .conftest import Server, eventually

#: A WebSocket handshake sent with httpx (trio-websocket leaves a refused one's socket open).
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def endpoints(chat_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("POST", "/chat", {}),
        ("GET", "/chats", None),
        ("GET", "/chats?q=hello", None),
        ("GET", f"/chat/{chat_id}", None),
        ("POST", "/generate", {"message": "hi", "chat_id": chat_id}),
        ("POST", "/generate", {"message": "hi", "chat_id": chat_id, "stream": True}),
        ("POST", f"/chat/{chat_id}/stop", None),
        ("GET", f"/chat/{chat_id}/events", None),
        ("GET", "/stats", None),
        ("GET", f"/stats?chat_id={chat_id}", None),
    ]


async def call(c: httpx.AsyncClient, method: str, path: str, body: Any) -> httpx.Response:
    return await c.request(method, path, json=body)


async def test_every_endpoint_needs_a_valid_token(server: Server) -> None:
    async with server.client() as c:
        chat_id = (await c.post("/generate", json={"message": "hello"})).json()["chat_id"]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as c:
            for method, path, body in endpoints(chat_id):
                r = await call(c, method, path, body)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["code"] == "unauthorized"
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/openapi.json")).status_code == 200


async def test_another_users_chat_is_404(server: Server) -> None:
    async with server.client("alice") as c:
        chat_id = (await c.post("/generate", json={"message": "hello"})).json()["chat_id"]
    async with server.client("bob") as c:
        for method, path, body in endpoints(chat_id):
            r = await call(c, method, path, body)
            if chat_id in path or (body or {}).get("chat_id"):
                assert r.status_code == 404, (method, path, r.text)
                assert r.json()["error"]["code"] == "chat_not_found"
            else:
                assert r.status_code in (200, 201), (method, path, r.text)
        assert (await c.get("/chats")).json()["chats"][0]["id"] != chat_id
        assert (await c.get("/chats", params={"q": "hello"})).json()["chats"] == []
        assert (await c.get("/stats")).json()["totals"]["responses"] == 0


def test_tokens_are_stored_hashed(settings: Settings) -> None:
    assert ensure_default_user(settings) is not None
    assert ensure_default_user(settings) is None  # only with no user at all
    token = add_user(settings, "carol")
    users = UserStore(settings)
    assert users.authenticate(token) == "carol" and users.authenticate("x" * 43) is None
    with users._tx() as tx:  # the table as stored
        rows = tx.all("SELECT token_hash, name FROM user_tokens")
    assert (hash_token(token), "carol") in [tuple(r) for r in rows]
    assert all(token not in str(r) for r in rows)


def test_tokens_are_listed_by_id_and_revoked(settings: Settings) -> None:
    users = UserStore(settings)
    first, second, other = (users.add_user(n) for n in ("carol", "carol", "dave"))
    listed = users.tokens()
    assert [t.name for t in listed] == ["carol", "carol", "dave"]
    by_id = {t.token_id: t for t in listed}
    assert set(by_id) == {hash_token(t)[:8] for t in (first, second, other)}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t.created_at) for t in listed)
    assert all(token not in repr(listed) for token in (first, second, other))

    assert users.revoke("dave", hash_token(second)[:8]) == 0  # carol's token, not dave's
    assert users.revoke("carol", hash_token(second)[:8].upper()) == 1
    assert users.authenticate(second) is None and users.authenticate(first) == "carol"
    with pytest.raises(ValueError, match="hex"):
        users.revoke("carol", "not-an-id")
    assert users.revoke("carol") == 1 and users.revoke("carol") == 0
    assert users.authenticate(first) is None and users.authenticate(other) == "dave"
    assert [t.name for t in users.tokens()] == ["dave"]


async def test_a_checked_token_is_trusted_for_the_cache_ttl_only(settings: Settings) -> None:
    users = UserStore(settings)
    token = await trio.to_thread.run_sync(users.add_user, "carol")
    auth = Authenticator(users, ttl_s=0.3)
    assert await auth.user_for(token) == "carol"
    await trio.to_thread.run_sync(users.revoke, "carol")
    assert await auth.user_for(token) == "carol"  # trusted until the entry expires
    await trio.sleep(0.35)
    assert await auth.user_for(token) is None


async def test_a_revoked_token_is_refused_by_a_running_server(server: Server) -> None:
    async with server.client("bob") as bob:
        assert (await bob.get("/chats")).status_code == 200  # now in the server's cache
        revoked_at = trio.current_time()
        assert await trio.to_thread.run_sync(UserStore(server.settings).revoke, "bob") == 1

        async def refused() -> bool:
            return (await bob.get("/chats")).status_code == 401

        await eventually(refused, TOKEN_CACHE_S + 2)
        assert trio.current_time() - revoked_at <= TOKEN_CACHE_S + 1
        handshake = await bob.get("/ws/chat", headers=UPGRADE)
        assert handshake.status_code == 401  # a refused WebSocket handshake
    async with server.client("alice") as alice:
        assert (await alice.get("/chats")).status_code == 200
        assert (await alice.get("/ws/chat", headers=UPGRADE)).status_code == 101
