"""Every REST endpoint of the contract, against the real server, on both stores."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import trio

from .conftest import Server, eventually, running_server, web_settings


async def create_chat(server: Server, user: str = "alice", **body: Any) -> dict[str, Any]:
    async with server.client(user) as c:
        r = await c.post("/chat", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_create_chat_is_readable_at_once(server: Server) -> None:
    chat = await create_chat(server, title="Plans", model="offline", system_prompt="Be brief.")
    assert chat["title"] == "Plans" and chat["message_count"] == 0
    assert set(chat) >= {"id", "title", "created_at", "updated_at", "model", "message_count",
                         "usage"}
    async with server.client() as c:
        listed = (await c.get("/chats")).json()
        page = (await c.get(f"/chat/{chat['id']}")).json()
    assert [x["id"] for x in listed["chats"]] == [chat["id"]]
    assert page == {"chat": page["chat"], "messages": [], "has_more": False}


async def test_generate_answers_with_the_reply(server: Server) -> None:
    async with server.client() as c:
        r = await c.post("/generate", json={"message": "hello there", "client_message_id": "a"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert set(answer) == {"chat_id", "response_id", "message"}
        message = answer["message"]
        assert message["role"] == "assistant" and message["status"] == "complete"
        assert message["response_id"] == answer["response_id"]
        assert "hello there" in message["content"] and message["model"] == "offline"
        assert message["usage"]["total_tokens"] > 0
        # read-your-writes: the chat and both messages are there
        page = (await c.get(f"/chat/{answer['chat_id']}")).json()
        assert [m["role"] for m in page["messages"]] == ["user", "assistant"]
        assert page["messages"][0]["client_message_id"] == "a"
        # the same client_message_id: the same answer, nothing new recorded
        again = (await c.post("/generate", json={"message": "hello there",
                                                  "chat_id": answer["chat_id"],
                                                  "client_message_id": "a"})).json()
        assert again == answer
        events = (await c.get(f"/chat/{answer['chat_id']}/events")).json()["events"]
        assert sum(e["type"] == "MessageReceived" for e in events) == 1


async def test_generate_with_a_tool(server: Server) -> None:
    async with server.client() as c:
        r = await c.post("/generate", json={"message": "what is 12*7"})
    message = r.json()["message"]
    assert "84" in message["content"]
    assert message["tool_calls"][0]["tool"] == "calculator"
    assert message["tool_calls"][0]["result"] == 84


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_generate_stream_sends_the_websocket_frames(server: Server) -> None:
    async with server.client() as c:
        r = await c.post("/generate", json={"message": "what is 6*7", "stream": True,
                                            "client_message_id": "s1"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    names = [name for name, _ in events]
    assert all(name == frame["event"] for name, frame in events)
    assert names[0] == "ack" and events[0][1]["client_message_id"] == "s1"
    assert names[-3:] == ["ai_response", "backend_status", "chat_history"]
    tools = [f for n, f in events if n == "tool_activity"]
    assert [t["status"] for t in tools] == ["started", "completed"]
    deltas = [f for n, f in events if n == "ai_response" and not f["done"]]
    text = "".join(d["delta"] for d in deltas)
    assert [d["offset"] for d in deltas] == [sum(len(x["delta"]) for x in deltas[:i])
                                             for i in range(len(deltas))]
    done = events[-3][1]
    assert done["done"] is True and done["message"] == text and done["status"] == "complete"
    assert done["finish_reason"] == "stop" and isinstance(done["seq"], int)


async def test_list_chats_pages_and_search(server: Server) -> None:
    for title in ("alpha", "beta", "gamma"):
        await create_chat(server, title=title)
    await create_chat(server, "bob", title="bob's")
    async with server.client() as c:
        first = (await c.get("/chats", params={"limit": 2})).json()
        assert [x["title"] for x in first["chats"]] == ["gamma", "beta"]
        second = (await c.get("/chats", params={"limit": 2,
                                                 "cursor": first["next_cursor"]})).json()
        assert [x["title"] for x in second["chats"]] == ["alpha"]
        assert second["next_cursor"] is None
        await c.post("/generate", json={"message": "tell me about photosynthesis"})
        found = (await c.get("/chats", params={"q": "photosynthesis"})).json()
        assert len(found["chats"]) == 1 and found["next_cursor"] is None


async def test_chat_pages_before_seq(server: Server) -> None:
    async with server.client() as c:
        chat_id = (await c.post("/generate", json={"message": "one"})).json()["chat_id"]
        await c.post("/generate", json={"message": "two", "chat_id": chat_id})
        latest = (await c.get(f"/chat/{chat_id}", params={"limit": 2})).json()
        assert [m["content"] for m in latest["messages"]][0] == "two"
        assert latest["has_more"] is True
        before = latest["messages"][0]["seq"]
        older = (await c.get(f"/chat/{chat_id}", params={"before_seq": before})).json()
        assert [m["role"] for m in older["messages"]] == ["user", "assistant"]
        assert older["messages"][0]["content"] == "one" and older["has_more"] is False


async def test_events_is_the_stored_log(server: Server) -> None:
    async with server.client() as c:
        chat_id = (await c.post("/generate", json={"message": "what is 2+3"})).json()["chat_id"]
        log = (await c.get(f"/chat/{chat_id}/events")).json()
        types = [e["type"] for e in log["events"]]
        assert types[:3] == ["Started", "MessageReceived", "ResponseStarted"]
        assert "ToolInvoked" in types and types[-1] == "ResponseCompleted"
        assert [e["seq"] for e in log["events"]] == list(range(1, len(types) + 1))
        assert log["next_after_seq"] == len(types)
        assert log["events"][1]["data"]["text"] == "what is 2+3"
        tail = (await c.get(f"/chat/{chat_id}/events",
                            params={"after_seq": 2, "limit": 1})).json()
        assert [e["seq"] for e in tail["events"]] == [3] and tail["next_after_seq"] == 3


async def test_stop_ends_the_running_response(server: Server) -> None:
    async with server.client() as c, trio.open_nursery() as nursery:
        chat_id = (await c.post("/chat", json={})).json()["id"]
        result: dict[str, Any] = {}

        async def generate() -> None:
            r = await c.post("/generate", json={"message": "/slow", "chat_id": chat_id})
            result.update(r.json())

        nursery.start_soon(generate)

        async def tokens_recorded() -> Any:
            r = await c.get(f"/chat/{chat_id}/events", params={"after_seq": 3})
            return r.json()["events"]

        await eventually(tokens_recorded)
        r = await c.post(f"/chat/{chat_id}/stop")
        assert r.status_code == 202 and r.json()["stopped"] is True
    assert result["message"]["status"] == "stopped"
    assert result["message"]["content"]  # the partial text is kept
    async with server.client() as c:
        again = await c.post(f"/chat/{chat_id}/stop")
    assert again.status_code == 202 and again.json()["stopped"] is False


async def test_stats_health_and_metrics(server: Server) -> None:
    async with server.client() as c:
        chat_id = (await c.post("/generate", json={"message": "what is 3*3"})).json()["chat_id"]
        stats = (await c.get("/stats")).json()
        assert stats["totals"]["responses"] == 1 and stats["totals"]["tool_calls"] == 1
        assert set(stats["live"]) == {"connections", "active_chats", "generating"}
        assert set(stats) >= {"totals", "latency_ms", "ttft_ms", "tokens_per_second", "tools",
                              "models", "live"}
        one = (await c.get("/stats", params={"chat_id": chat_id})).json()
        assert one["totals"]["messages"] == 2
        health = await c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
    async with server.scraper() as scraper:
        with trio.fail_after(5):
            while True:
                metrics = (await scraper.get("/metrics"))
                if "gen_ai_client_token_usage_bucket" in metrics.text:
                    break
                await trio.sleep(0.05)
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("gen_ai_client_token_usage_bucket", "gen_ai_client_operation_duration_seconds",
                 "gen_ai_server_time_to_first_token_seconds",
                 "gen_ai_server_time_per_output_token_seconds", "eventchat_websocket_connections",
                 "eventchat_active_chats", "eventchat_mailbox_depth", "eventchat_projection_lag"):
        assert name in metrics.text, name
    assert 'gen_ai_token_type="input"' in metrics.text


async def test_error_statuses(server: Server) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    async with server.client() as c:
        cases = [
            (await c.post("/generate", content=b"{not json",
                          headers={"Content-Type": "application/json"}), 400),
            (await c.post("/generate", json={"chat_id": missing}), 400),
            (await c.post("/generate", json={"message": 5}), 400),
            (await c.post("/generate", json={"message": "   "}), 400),
            (await c.post("/generate", json={"message": "x" * 32_001}), 400),
            (await c.get("/chats", params={"limit": "many"}), 400),
            (await c.get(f"/chat/{missing}"), 404),
            (await c.get("/chat/not-a-uuid"), 404),
            (await c.post("/generate", json={"message": "hi", "chat_id": missing}), 404),
            (await c.post(f"/chat/{missing}/stop"), 404),
            (await c.get(f"/chat/{missing}/events"), 404),
            (await c.get("/stats", params={"chat_id": missing}), 404),
            (await c.post("/chat", content=b"{" + b" " * 300_000 + b"}",
                          headers={"Content-Type": "application/json"}), 413),
        ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert cases[3][0].json()["error"]["code"] == "empty_message"
    assert cases[4][0].json()["error"]["code"] == "message_too_long"


async def test_rate_limits(settings: Any) -> None:
    async with running_server(web_settings(settings, messages_per_minute=2)) as server:
        async with server.client() as c:
            for _ in range(2):
                assert (await c.post("/generate", json={"message": "hi"})).status_code == 200
            r = await c.post("/generate", json={"message": "hi"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60


async def test_concurrent_responses_limit(settings: Any) -> None:
    async with running_server(web_settings(settings, concurrent_responses=1)) as server:
        async with server.client() as c, trio.open_nursery() as nursery:
            chat_id = (await c.post("/chat", json={})).json()["id"]
            nursery.start_soon(partial(c.post, "/generate",
                                       json={"message": "/slow", "chat_id": chat_id}))

            async def generating() -> Any:
                return (await c.get("/stats")).json()["live"]["generating"]

            await eventually(generating)
            r = await c.post("/generate", json={"message": "another"})
            assert r.status_code == 429 and "Retry-After" in r.headers
            await c.post(f"/chat/{chat_id}/stop")


async def test_openapi_is_served(server: Server) -> None:
    async with server.client(None) as c:
        spec = (await c.get("/openapi.json")).json()
    for path in ("/chat", "/chats", "/chat/{chat_id}", "/generate", "/chat/{chat_id}/stop",
                 "/chat/{chat_id}/events", "/stats", "/health", "/metrics"):
        assert path in spec["paths"], path


async def test_a_chat_without_a_title_is_titled_by_its_first_message(server: Server) -> None:
    long_line = "word " * 30
    async with server.client() as c:
        first = (await c.post("/generate", json={"message": "\n  What is 12*7?\nThanks"})).json()
        titled = (await c.post("/chat", json={"title": "Mine"})).json()["id"]
        await c.post("/generate", json={"message": "hello there", "chat_id": titled})
        untitled = (await c.post("/chat", json={})).json()["id"]
        await c.post("/generate", json={"message": "😀 " + long_line, "chat_id": untitled})
        await c.post("/generate", json={"message": "a second message", "chat_id": untitled})
        titles = {chat["id"]: chat["title"] for chat in (await c.get("/chats")).json()["chats"]}
    assert titles[first["chat_id"]] == "What is 12*7?"
    assert titles[titled] == "Mine"
    title = titles[untitled]
    assert title.startswith("😀 word word") and title.endswith("…") and len(title) <= 80
