"""Every endpoint without a token, with a wrong one, and with another user's."""

from __future__ import annotations

from typing import Any

import httpx

from app.config import Settings
from app.web.users import UserStore, add_user, ensure_default_user, hash_token

from .conftest import Server


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
        ("GET", "/metrics", None),
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
    rows = users._query("SELECT token_hash, name FROM {table}")
    assert (hash_token(token), "carol") in [tuple(r) for r in rows]
    assert all(token not in str(r) for r in rows)
