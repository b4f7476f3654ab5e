"""Token budgets: one user's daily budget holds across two ``eventchat serve`` processes that
share PostgreSQL, within one turn's usage; refusals record nothing; ``GET /usage`` agrees."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from app.config import Budget, Budgets, Settings
from app.storage.users import add_user
from tests.test_process_crash import free_port, server_env, server_process, wait_healthy

from .conftest import running_server, web_settings

BUDGET = 250


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_daily_budget_holds_across_two_server_processes(
    settings: Settings, tmp_path: Path
) -> None:
    config = tmp_path / "eventchat.toml"
    config.write_text(f"[models.offline]\n\n[budgets]\ndaily_tokens = {BUDGET}\n\n"
                      "[budgets.users.bob]\ndaily_tokens = 1000000\n", encoding="utf-8")
    env = {**server_env(settings), "EVENTCHAT_CONFIG": str(config),
           "EVENTCHAT_OFFLINE_TOKEN_DELAY_S": "0.001"}
    tokens = {name: await trio.to_thread.run_sync(add_user, settings, name)
              for name in ("alice", "bob")}
    ports = (free_port(), free_port())
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    log = tmp_path / "servers.log"
    with server_process(env, ports[0], log) as one, server_process(env, ports[1], log) as two:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_healthy, urls[0], one)
            nursery.start_soon(wait_healthy, urls[1], two)
        clients = [httpx.AsyncClient(base_url=url, timeout=20,
                                     headers={"Authorization": f"Bearer {tokens['alice']}"})
                   for url in urls]
        try:
            # one chat, its turns sent to either process in turn, until the budget is used up
            used: list[int] = []
            chat_id: str | None = None
            for n in range(30):
                body: dict[str, Any] = {"message": f"tell me about the number {n}"}
                if chat_id is not None:
                    body["chat_id"] = chat_id
                answer = await clients[n % 2].post("/generate", json=body)
                if answer.status_code == 429:
                    break
                assert answer.status_code == 200, answer.text
                chat_id = answer.json()["chat_id"]
                used.append(answer.json()["message"]["usage"]["total_tokens"])
            refused = answer
            assert len(used) >= 3  # the budget took several turns, on both processes
            # admitted while under the budget: only the last turn went past it
            assert sum(used[:-1]) < BUDGET <= sum(used)

            # the other process refuses too, over HTTP and WebSocket, new chat or not
            other = clients[len(used) % 2 - 1]
            new_chat = await other.post("/generate", json={"message": "a new chat?"})
            ws_url = urls[(len(used) + 1) % 2].replace("http", "ws", 1)
            async with open_websocket_url(
                f"{ws_url}/ws/chat?access_token={tokens['alice']}"
            ) as ws:
                await ws.send_message(json.dumps({"message": "one more", "chat_id": chat_id,
                                                  "client_message_id": "late"}))
                with trio.fail_after(10):
                    frame = json.loads(await ws.get_message())
            events = (await other.get(f"/chat/{chat_id}/events")).json()["events"]
            chats = (await other.get("/chats")).json()["chats"]
            usage = [(await c.get("/usage")).json() for c in clients]
            async with httpx.AsyncClient(base_url=urls[1], timeout=20, headers={
                    "Authorization": f"Bearer {tokens['bob']}"}) as bob:
                bobs = await bob.post("/generate", json={"message": "hello"})
        finally:
            for client in clients:
                await client.aclose()

    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    for response in (refused, new_chat):
        assert response.status_code == 429
        error = response.json()["error"]
        assert error["code"] == "quota_exceeded" and str(BUDGET) in error["message"]
        assert error["reset_at"] == midnight.isoformat(timespec="seconds")
        assert 0 < int(response.headers["Retry-After"]) <= 86_400
    assert frame["event"] == "error" and frame["code"] == "quota_exceeded"
    assert frame["chat_id"] == chat_id and frame["client_message_id"] == "late"
    assert frame["reset_at"] == midnight.isoformat(timespec="seconds")

    # refused messages recorded nothing: no message, no chat
    assert [e["type"] for e in events].count("MessageReceived") == len(used)
    assert [c["id"] for c in chats] == [chat_id]

    # GET /usage (the projection) says the same on both processes
    today = now.date().isoformat()
    for page in usage:
        assert page["usage"] == [{"day": today, "model": "offline", "responses": len(used),
                                  "prompt_tokens": page["usage"][0]["prompt_tokens"],
                                  "completion_tokens": page["usage"][0]["completion_tokens"],
                                  "total_tokens": sum(used)}]
        assert page["budget"]["daily_tokens"] == BUDGET
    # another user's budget is their own
    assert bobs.status_code == 200


async def test_a_budget_per_model_refuses_that_model_only(settings: Any) -> None:
    """Only the model whose budget is used up is refused, per turn and per chat; a message
    re-sent with its ``client_message_id`` is still answered; the refusal records nothing."""
    budgets = Budgets(Budget(models=(("offline-large", 40),)))
    s = web_settings(settings, models=("offline-large",), budgets=budgets)
    async with running_server(s) as server, server.client() as c:
        first = await c.post("/generate", json={"message": "hello there, large model",
                                                "model": "offline-large",
                                                "client_message_id": "m-1"})
        chat_id = first.json()["chat_id"]
        while (await c.get("/usage")).json()["usage"][0]["total_tokens"] < 40:
            turn = await c.post("/generate", json={"message": "more", "chat_id": chat_id,
                                                   "model": "offline-large"})
            assert turn.status_code == 200
        large_chat = (await c.post("/chat", json={"model": "offline-large"})).json()["id"]
        before = (await c.get(f"/chat/{chat_id}/events")).json()["events"]
        refused = await c.post("/generate", json={"message": "again", "chat_id": chat_id,
                                                  "model": "offline-large"})
        by_chat = await c.post("/generate", json={"message": "again", "chat_id": large_chat})
        resent = await c.post("/generate", json={"message": "hello there, large model",
                                                 "chat_id": chat_id, "client_message_id": "m-1"})
        other = await c.post("/generate", json={"message": "and you?", "chat_id": chat_id})
        after = (await c.get(f"/chat/{chat_id}/events")).json()["events"]
        usage = (await c.get("/usage")).json()
    assert first.status_code == 200 and first.json()["message"]["model"] == "offline"
    for response in (refused, by_chat):
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "quota_exceeded"
        assert "offline-large" in response.json()["error"]["message"]
    assert resent.status_code == 200
    assert resent.json()["response_id"] == first.json()["response_id"]
    assert other.status_code == 200  # the chat's own model has no budget
    texts = [[e["data"]["text"] for e in events if e["type"] == "MessageReceived"]
             for events in (before, after)]
    assert texts[1] == [*texts[0], "and you?"]  # refused and re-sent messages added nothing
    assert {row["model"] for row in usage["usage"]} == {"offline-large", "offline"}
    assert usage["budget"] == {"daily_tokens": None, "models": {"offline-large": 40},
                               "resets_at": usage["budget"]["resets_at"]}
