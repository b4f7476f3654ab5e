"""Tools that need a person's approval, end to end: the real server, WebSocket and REST
clients, a scripted model on the fake OpenAI server (PROTOCOL.md 1.1, "Tools that need
approval")."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection

from app.config import Settings
from tests.fakes.openai_server import FakeToolCall, StreamReply, fake_openai_server

from .conftest import eventually, receive_until, running_server, send, web_settings


def calculator(expression: str) -> StreamReply:
    return StreamReply([], tool_calls=[FakeToolCall("calculator", {"expression": expression})])


def approval_settings(settings: Settings, base_url: str, **changes: Any) -> Settings:
    return web_settings(settings, provider="openai", model="fake-model", max_retries=0,
                        openai_api_key="test-key", openai_base_url=base_url,
                        approval_tools=("calculator",), **changes)


def is_(event: str) -> Any:
    return lambda frame: frame["event"] == event


def done(frame: dict[str, Any]) -> bool:
    return frame["event"] == "ai_response" and frame["done"]


def tool_result_sent(request: dict[str, Any]) -> Any:
    """What the model was told of the (last) tool call in ``request``."""
    tool = [m for m in request["messages"] if m["role"] == "tool"][-1]
    return json.loads(tool["content"])


async def wait_for_approval(ws: WebSocketConnection) -> dict[str, Any]:
    frames = await receive_until(ws, is_("tool_approval"))
    return frames[-1]


async def test_approve_deny_and_two_tabs_deciding_at_once(settings: Settings) -> None:
    async with fake_openai_server(
        StreamReply(["Let me compute. "], tool_calls=[
            FakeToolCall("calculator", {"expression": "6*7"})]),
        StreamReply(["It is 42."]),
        calculator("2**10"),
        StreamReply(["I was not allowed to compute it."]),
    ) as upstream:
        s = approval_settings(settings, upstream.base_url)
        async with running_server(s) as server, server.websocket() as tab_a, \
                server.websocket() as tab_b, server.client() as rest:
            await send(tab_a, {"message": "what is 6*7?"})
            asked = await wait_for_approval(tab_a)
            chat_id, call_id = asked["chat_id"], asked["call_id"]
            assert asked["tool"] == "calculator"
            assert asked["arguments"] == {"expression": "6*7"}
            assert len(upstream.requests) == 1  # the turn waits: the tool has not run

            # a tab that subscribes while the call waits is asked too, after the history and
            # the text so far
            await send(tab_b, {"event": "subscribe", "chat_id": chat_id})
            joined = await receive_until(tab_b, is_("tool_approval"))
            assert [f["event"] for f in joined] == ["chat_history", "ai_response",
                                                    "tool_approval"]
            assert joined[1]["delta"] == "Let me compute. "
            assert joined[2]["call_id"] == call_id

            # both tabs decide at once: the first recorded wins, the other is refused
            decision = {"event": "tool_decision", "chat_id": chat_id, "call_id": call_id,
                        "approve": True}
            await send(tab_a, {**decision, "reason": "tab a"})
            await send(tab_b, {**decision, "reason": "tab b"})
            seen_a = await receive_until(tab_a, done)
            seen_b = await receive_until(tab_b, done)
            decided = [f for f in seen_a if f["event"] == "tool_decided"]
            assert decided == [f for f in seen_b if f["event"] == "tool_decided"]
            assert len(decided) == 1 and decided[0]["decided_by"] == "alice"
            winner = decided[0]["reason"]
            loser = seen_b if winner == "tab a" else seen_a
            refused = [f for f in seen_a + seen_b if f["event"] == "error"]
            assert [(f["code"], f["call_id"]) for f in refused] == [("already_decided", call_id)]
            assert refused[0] in loser
            ran = [f for f in seen_a if f["event"] == "tool_activity"]
            assert [f["status"] for f in ran] == ["completed"]
            assert ran[-1]["result"] == 42
            assert seen_a[-1]["message"] == "Let me compute. It is 42."
            assert seen_a[-1]["status"] == "complete"
            assert tool_result_sent(upstream.requests[1]) == 42

            # deny over REST, with a reason: the tool is not run and the model is told
            await send(tab_a, {"message": "what is 2**10?", "chat_id": chat_id})
            second = await wait_for_approval(tab_a)
            path = f"/chat/{chat_id}/tool-decision"
            answer = await rest.post(path, json={"call_id": second["call_id"],
                                                 "approve": False, "reason": "not now"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["approve"] is False
            again = await rest.post(path, json={"call_id": second["call_id"], "approve": True})
            assert again.status_code == 409
            assert again.json()["error"]["code"] == "already_decided"
            unknown = await rest.post(path, json={"call_id": "call_nope", "approve": True})
            assert unknown.status_code == 404
            assert unknown.json()["error"]["code"] == "tool_call_not_found"
            for bad in ({"call_id": call_id}, {"call_id": call_id, "approve": "yes"}, [1]):
                refused_body = await rest.post(path, json=bad)
                assert refused_body.status_code == 400
                assert "code" in refused_body.json()["error"]
            ended = await receive_until(tab_a, done)
            failed = [f for f in ended if f["event"] == "tool_activity"][-1]
            assert failed["status"] == "failed" and failed["error"] == "denied: not now"
            assert tool_result_sent(upstream.requests[3]) == {"error": "denied: not now"}
            assert ended[-1]["message"] == "I was not allowed to compute it."

            page = (await rest.get(f"/chat/{chat_id}")).json()
            calls = [c for m in page["messages"] for c in m.get("tool_calls") or []]
            assert [(c["result"], c["error"]) for c in calls] == [
                (42, None), (None, "denied: not now")]
            stats = (await rest.get("/stats", params={"chat_id": chat_id})).json()
            assert stats["tools"]["calculator"]["calls"] == 2
            assert stats["tools"]["calculator"]["errors"] == 1
            events = (await rest.get(f"/chat/{chat_id}/events")).json()["events"]
            kinds = [e["type"] for e in events]
            assert kinds.count("ToolApprovalRequested") == 2
            assert kinds.count("ToolDecided") == 2


async def test_a_waiting_call_survives_restarts_and_times_out_as_denied(
    settings: Settings,
) -> None:
    async with fake_openai_server(
        calculator("6*7"),
        StreamReply(["After the restart: 42."]),
        calculator("1/0"),
        StreamReply(["Nobody answered in time."]),
    ) as upstream:
        s = approval_settings(settings, upstream.base_url)
        async with running_server(s) as server, server.websocket() as ws:
            await send(ws, {"message": "what is 6*7?"})
            asked = await wait_for_approval(ws)
        chat_id, call_id = asked["chat_id"], asked["call_id"]

        # the server stopped while the call waited: the response was not ended, and the
        # restarted server asks again; the decision continues the same turn
        async with running_server(s) as server, server.websocket() as ws:
            await send(ws, {"event": "subscribe", "chat_id": chat_id})
            joined = await receive_until(ws, is_("tool_approval"))
            assert joined[0]["event"] == "chat_history"
            assert all(m.get("status") != "interrupted" for m in joined[0]["messages"])
            assert (joined[-1]["call_id"], joined[-1]["response_id"]) == (
                call_id, asked["response_id"])
            async with server.client() as rest:
                answer = await rest.post(f"/chat/{chat_id}/tool-decision",
                                         json={"call_id": call_id, "approve": True})
                assert answer.status_code == 200, answer.text
            resumed = await receive_until(ws, done)
            assert resumed[-1]["response_id"] == asked["response_id"]
            assert (resumed[-1]["status"], resumed[-1]["message"]) == (
                "complete", "After the restart: 42.")
            # the model was called again with the history and the tool's result
            request = upstream.requests[1]
            assert request["messages"][-3]["content"] == "what is 6*7?"
            assert request["messages"][-2]["tool_calls"][0]["id"] == call_id
            assert tool_result_sent(request) == 42

            await send(ws, {"message": "what is 1/0?", "chat_id": chat_id})
            late = await wait_for_approval(ws)

        # no decision within the timeout (counted from the request, across the restart):
        # the call is denied, recorded, and the model told so
        s = s.replace(tool_approval_timeout_s=0.5)
        async with running_server(s) as server, server.client() as rest:

            async def reply_ended() -> dict[str, Any] | None:
                page = (await rest.get(f"/chat/{chat_id}")).json()
                last: dict[str, Any] = page["messages"][-1]
                return last if last.get("status") not in (None, "streaming") else None

            reply = await eventually(reply_ended)
            events = (await rest.get(f"/chat/{chat_id}/events")).json()["events"]
        assert (reply["response_id"], reply["status"], reply["content"]) == (
            late["response_id"], "complete", "Nobody answered in time.")
        assert reply["tool_calls"][-1]["error"] == "denied: timeout"
        decisions = [e["data"] for e in events if e["type"] == "ToolDecided"]
        assert [(d["call_id"], d["approve"], d["reason"], d["decided_by"]) for d in decisions] \
            == [(call_id, True, None, "alice"), (late["call_id"], False, "timeout", "eventchat")]
        assert tool_result_sent(upstream.requests[3]) == {"error": "denied: timeout"}


@pytest.mark.parametrize("store_kind", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_decision_sent_to_another_server_continues_the_turn(settings: Settings) -> None:
    s = web_settings(settings, approval_tools=("calculator",))  # the offline model's tool
    async with running_server(s) as one, running_server(s) as two, \
            one.websocket() as driver, two.websocket() as follower:
        await send(driver, {"message": "what is 12*7"})
        asked = await wait_for_approval(driver)
        await send(follower, {"event": "subscribe", "chat_id": asked["chat_id"]})
        assert (await wait_for_approval(follower))["call_id"] == asked["call_id"]
        async with two.client() as rest:
            answer = await rest.post(f"/chat/{asked['chat_id']}/tool-decision",
                                     json={"call_id": asked["call_id"], "approve": True})
            assert answer.status_code == 200, answer.text
        with trio.fail_after(15):  # long before the timeout (300 s)
            driven = await receive_until(driver, done)
            followed = await receive_until(follower, done)
        assert "84" in driven[-1]["message"] and driven[-1]["status"] == "complete"
        assert followed[-1]["message"] == driven[-1]["message"]
