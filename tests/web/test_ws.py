"""The WebSocket frames and the guarantees 1-6 of the contract, over real sockets."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from .conftest import (
    Server,
    close_transport,
    eventually,
    receive,
    receive_until,
    running_server,
    send,
    turn_done,
    web_settings,
)


def done(frame: dict[str, Any]) -> bool:
    return frame["event"] == "ai_response" and frame["done"]


def rebuild(frames: list[dict[str, Any]], response_id: str) -> str:
    """A reply rebuilt from its deltas by offset; fails on a gap or a doubled character."""
    text = ""
    for f in frames:
        if f["event"] == "ai_response" and not f["done"] and f["response_id"] == response_id:
            assert f["offset"] == len(text), (f["offset"], len(text))
            text += f["delta"]
    return text


async def test_a_turn_sends_every_frame_in_order(server: Server) -> None:
    async with server.websocket() as ws:
        await send(ws, {"event": "user_message", "message": "what is 12*7",
                        "client_message_id": "c1"})
        frames = await receive_until(ws, turn_done)
    ack = frames[0]
    assert ack["event"] == "ack" and ack["client_message_id"] == "c1" and ack["seq"] == 2
    chat_id = ack["chat_id"]
    assert all(f["chat_id"] == chat_id for f in frames)
    tools = [f for f in frames if f["event"] == "tool_activity"]
    assert [(t["tool"], t["status"]) for t in tools] == [("calculator", "started"),
                                                         ("calculator", "completed")]
    assert tools[0]["arguments"] == {"expression": "12*7"} and tools[1]["result"] == 84
    end = next(f for f in frames if done(f))
    assert end["message"] == rebuild(frames, end["response_id"]) and "84" in end["message"]
    assert end["status"] == "complete" and end["finish_reason"] == "stop"
    status = frames[-2]
    assert status["event"] == "backend_status" and status["model"] == "offline"
    assert status["tokens_used"] == status["prompt_tokens"] + status["completion_tokens"] > 0
    assert set(status) >= {"latency_ms", "ttft_ms", "tokens_per_second", "active_chats",
                           "queue_depth"}
    history = frames[-1]
    assert [m["seq"] for m in history["messages"]] == [2, 3]
    assert history["last_seq"] == end["seq"]
    # the turn's messages come from its live events, exactly as the history views hold them
    async with server.client() as c:
        page = (await c.get(f"/chat/{chat_id}")).json()
    assert history["messages"] == page["messages"]
    assert page["messages"][1]["tool_calls"][0]["result"] == 84


async def test_a_follower_that_joined_mid_turn_gets_the_same_history(server: Server) -> None:
    """A follower that did not see the turn begin gets its ``chat_history`` from the views:
    the same messages as the sender's, which were built from the live events."""
    async with server.websocket() as a, server.websocket() as b:
        await send(a, {"message": "/tokens 200"})
        ack = await receive(a)
        await receive_until(a, lambda f: f["event"] == "ai_response" and not f["done"])
        await send(b, {"event": "subscribe", "chat_id": ack["chat_id"]})
        joined = await receive_until(b, turn_done)
        sent = await receive_until(a, turn_done)
    assert joined[0]["event"] == "chat_history"  # on subscribe, then the rest of the turn
    assert [m["seq"] for m in sent[-1]["messages"]] == [2, 3]
    assert joined[-1]["messages"] == sent[-1]["messages"]
    assert sent[-1]["messages"][1]["usage"]["completion_tokens"] == 200


async def test_ack_means_durable(server: Server) -> None:
    """Guarantee 1: once acknowledged, the message is in the stored log."""
    async with server.websocket() as ws, server.client() as c:
        await send(ws, {"message": "keep this", "client_message_id": "k"})
        ack = await receive(ws)
        log = (await c.get(f"/chat/{ack['chat_id']}/events")).json()["events"]
        stored = [e for e in log if e["seq"] == ack["seq"]]
        assert stored[0]["type"] == "MessageReceived"
        assert stored[0]["data"] == {"text": "keep this", "client_message_id": "k", "model": None,
                                     "parent_seq": None, "edit_of": None}


async def test_resending_a_client_message_id_creates_nothing(server: Server) -> None:
    """Guarantee 2: the same ack, and the finished turn's result."""
    async with server.websocket() as ws:
        await send(ws, {"message": "once", "client_message_id": "same"})
        first = await receive_until(ws, turn_done)
        chat_id = first[0]["chat_id"]
    async with server.websocket() as ws:
        await send(ws, {"message": "once", "client_message_id": "same", "chat_id": chat_id})
        again = await receive_until(ws, turn_done)
    assert again[0] == first[0]
    assert next(f for f in again if done(f))["message"] == next(
        f for f in first if done(f))["message"]
    async with server.client() as c:
        log = (await c.get(f"/chat/{chat_id}/events")).json()["events"]
    assert sum(e["type"] == "MessageReceived" for e in log) == 1


async def test_a_response_outlives_its_clients(server: Server) -> None:
    """Guarantee 3: every client gone, the response still runs to its end."""
    async with server.websocket() as ws:
        await send(ws, {"message": "/tokens 300"})
        ack = await receive(ws)
        await receive(ws)  # the first delta: it is running
    async with server.client() as c:

        async def finished() -> Any:
            page = (await c.get(f"/chat/{ack['chat_id']}")).json()
            return [m for m in page["messages"] if m.get("status") == "complete"]

        [answer] = await eventually(finished)
    assert answer["usage"]["completion_tokens"] == 300


async def test_stop_ends_the_response_early(server: Server) -> None:
    async with server.websocket() as ws:
        await send(ws, {"message": "/slow"})
        ack = await receive(ws)
        await receive(ws)
        await send(ws, {"event": "stop", "chat_id": ack["chat_id"]})
        frames = await receive_until(ws, done)
    assert frames[-1]["status"] == "stopped" and frames[-1]["finish_reason"] == "stopped"
    assert frames[-1]["message"].startswith("lorem")


async def test_messages_wait_their_turn(server: Server) -> None:
    """Guarantee 4: one at a time, in arrival order."""
    async with server.websocket() as ws:
        await send(ws, {"message": "/tokens 20", "client_message_id": "1"})
        ack = await receive(ws)
        for n in (2, 3):
            await send(ws, {"message": f"/tokens {n * 10}", "client_message_id": str(n),
                            "chat_id": ack["chat_id"]})
        ends = 0

        def third_done(frame: dict[str, Any]) -> bool:
            nonlocal ends
            ends += done(frame)
            return ends == 3

        frames = await receive_until(ws, third_done)
    acks = [ack] + [f for f in frames if f["event"] == "ack"]
    assert [a["client_message_id"] for a in acks] == ["1", "2", "3"]
    async with server.client() as c:
        log = (await c.get(f"/chat/{ack['chat_id']}/events")).json()["events"]
    answering = [e["data"]["reply_to_seq"] for e in log if e["type"] == "ResponseStarted"]
    assert answering == [a["seq"] for a in acks]
    kinds = [e["type"] for e in log if e["type"] in ("ResponseStarted", "ResponseCompleted")]
    assert kinds == ["ResponseStarted", "ResponseCompleted"] * 3


async def test_every_follower_receives_every_frame(server: Server) -> None:
    """Guarantee 5: several connections on one chat."""
    async with server.client() as c:
        chat_id = (await c.post("/chat", json={})).json()["id"]
    async with server.websocket() as a, server.websocket() as b, server.websocket() as other:
        for ws in (b, other):
            await send(ws, {"event": "subscribe", "chat_id": chat_id})
            assert (await receive(ws))["event"] == "chat_history"
        await send(other, {"event": "unsubscribe", "chat_id": chat_id})
        await send(a, {"message": "/tokens 50", "chat_id": chat_id})
        seen_a = await receive_until(a, turn_done)
        seen_b = await receive_until(b, turn_done)
        await send(other, {"event": "bogus"})
        assert (await receive(other))["code"] == "unknown_event"  # nothing came meanwhile
    assert seen_a[1:] == seen_b


async def test_resume_rebuilds_every_response_exactly_once(settings: Any) -> None:
    """Guarantee 6: reconnect mid-response, subscribe, rebuild from offsets."""
    async with running_server(web_settings(settings, offline_token_delay_s=0.01)) as server:
        async with server.websocket() as ws:
            await send(ws, {"message": "/tokens 120"})
            ack = await receive(ws)
            before = [await receive(ws) for _ in range(20)]
        response_id = before[0]["response_id"]
        async with server.websocket() as ws:
            await send(ws, {"event": "subscribe", "chat_id": ack["chat_id"],
                            "after_seq": ack["seq"]})
            after = await receive_until(ws, done)
    history = after[0]
    assert history["event"] == "chat_history" and history["last_seq"] >= ack["seq"]
    resumed = after[1]
    assert resumed["offset"] == 0 and resumed["response_id"] == response_id
    text = rebuild(after, response_id)
    assert text == after[-1]["message"]
    assert text.startswith(rebuild(before, response_id))
    assert len(text.split()) == 120


async def test_subscribe_sends_history(server: Server) -> None:
    async with server.client() as c:
        chat_id = (await c.post("/generate", json={"message": "hello"})).json()["chat_id"]
    async with server.websocket() as ws:
        await send(ws, {"event": "subscribe", "chat_id": chat_id})
        history = await receive(ws)
        await send(ws, {"event": "subscribe", "chat_id": chat_id, "after_seq": 2})
        later = await receive(ws)
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
    assert history["has_more"] is False and history["last_seq"] >= 4
    assert [m["role"] for m in later["messages"]] == ["assistant"]


async def test_bad_frames_get_an_error_and_the_connection_stays(server: Server) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    async with server.websocket() as ws:
        cases = {
            "{nope": "invalid_json",
            "[1, 2]": "invalid_frame",
            '{"event": "dance"}': "unknown_event",
            '{"event": "subscribe"}': "invalid_request",
            '{"event": "user_message", "message": ""}': "empty_message",
            '{"event": "user_message", "message": "%s"}' % ("x" * 32_001): "message_too_long",
        }
        for raw, code in cases.items():
            await ws.send_message(raw)
            frame = await receive(ws)
            assert frame["event"] == "error" and frame["code"] == code, (raw, frame)
        for event in ("subscribe", "stop"):
            await send(ws, {"event": event, "chat_id": missing})
            assert (await receive(ws))["code"] == "chat_not_found"
        await send(ws, {"message": "hi", "chat_id": missing, "client_message_id": "x"})
        frame = await receive(ws)
        assert frame["code"] == "chat_not_found" and frame["client_message_id"] == "x"
        await send(ws, {"message": "still here"})
        assert (await receive(ws))["event"] == "ack"


async def test_frame_size_limit_closes_1009(server: Server) -> None:
    async with server.websocket() as ws:
        await ws.send_message("x" * (64 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
        await close_transport(ws)
    assert closed.value.reason.code == 1009


async def test_message_rate_limit(settings: Any) -> None:
    async with running_server(web_settings(settings, messages_per_minute=1)) as server:
        async with server.websocket() as ws:
            await send(ws, {"message": "one"})
            ack = await receive(ws)
            await send(ws, {"message": "two", "chat_id": ack["chat_id"],
                            "client_message_id": "t"})
            frames = await receive_until(ws, lambda f: f["event"] == "error")
    assert frames[-1]["code"] == "rate_limited" and frames[-1]["client_message_id"] == "t"


async def test_a_resent_message_gets_its_ack_even_over_the_rate_limit(settings: Any) -> None:
    async with running_server(web_settings(settings, messages_per_minute=1)) as server:
        async with server.websocket() as ws:
            await send(ws, {"message": "one", "client_message_id": "first"})
            ack = await receive(ws)
            await receive_until(ws, lambda f: f["event"] == "chat_history")
            await send(ws, {"message": "one", "chat_id": ack["chat_id"],
                            "client_message_id": "first"})
            again = await receive_until(ws, lambda f: f["event"] in ("ack", "error"))
        async with server.client() as client:
            page = (await client.get(f"/chat/{ack['chat_id']}")).json()
    assert again[-1] == ack  # the same ack, not rate_limited
    assert [m["content"] for m in page["messages"] if m["role"] == "user"] == ["one"]


async def test_an_idle_connection_is_closed(settings: Any) -> None:
    async with running_server(web_settings(settings, ws_idle_timeout_s=0.5)) as server:
        async with server.websocket() as ws:
            await send(ws, {"message": "hello"})
            await receive_until(ws, lambda f: f["event"] == "chat_history")
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await receive(ws)
            await close_transport(ws)
    assert (closed.value.reason.code, closed.value.reason.reason) == (1001, "idle timeout")


async def handshake(server: Server, url: str, headers: dict[str, str]) -> int:
    """The status of a WebSocket handshake (sent with httpx: only the answer matters)."""
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    async with server.client(None) as c:
        r = await c.get(url, headers={**upgrade, **headers})
    return r.status_code


async def test_handshake_checks_token_and_origin(server: Server) -> None:
    token = server.tokens["alice"]
    bearer = {"Authorization": f"Bearer {token}"}
    for url, headers, status in [
        ("/ws/chat", {}, 401),
        ("/ws/chat", {"Authorization": "Bearer wrong"}, 401),
        ("/ws/chat?access_token=wrong", {}, 401),
        ("/ws/chat", {**bearer, "Origin": "http://evil.example"}, 403),
        ("/ws/chat", {**bearer, "Origin": server.base_url}, 101),
        (f"/ws/chat?access_token={token}", {}, 101),
    ]:
        assert await handshake(server, url, headers) == status, (url, headers)
    own = server.base_url.encode()
    async with open_websocket_url(server.ws_url + f"?access_token={token}",
                                  extra_headers=[(b"Origin", own)]) as ws:
        await send(ws, {"message": "hi"})
        assert (await receive(ws))["event"] == "ack"


async def test_allowed_origins_setting(settings: Any) -> None:
    allowed = web_settings(settings, allowed_origins=("https://app.example",))
    async with running_server(allowed) as server:
        origin = [(b"Origin", b"https://app.example")]
        async with server.websocket(extra_headers=origin) as ws:
            await send(ws, {"message": "hi"})
            assert (await receive(ws))["event"] == "ack"


async def test_another_users_chat_is_not_found(server: Server) -> None:
    async with server.client("bob") as c:
        chat_id = (await c.post("/chat", json={})).json()["id"]
    async with server.websocket("alice") as ws:
        for frame in ({"event": "subscribe", "chat_id": chat_id},
                      {"event": "stop", "chat_id": chat_id},
                      {"message": "hi", "chat_id": chat_id}):
            await send(ws, frame)
            assert (await receive(ws))["code"] == "chat_not_found"


async def test_shutdown_interrupts_and_says_goodbye(settings: Any) -> None:
    """Stopping the server: the running response ends as interrupted, clients see it."""
    ws_settings = web_settings(settings)
    async with running_server(ws_settings, grace_s=0.2) as server:
        async with server.websocket() as ws:
            await send(ws, {"message": "/slow"})
            ack = await receive(ws)
            await receive(ws)
            server.stop()
            frames: list[dict[str, Any]] = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(await receive(ws))
            await close_transport(ws)
    assert closed.value.reason.code == 1001
    end = next(f for f in frames if done(f))
    assert end["status"] == "interrupted" and end["message"].startswith("lorem")
    async with running_server(ws_settings) as again, again.client() as c:
        page = (await c.get(f"/chat/{ack['chat_id']}")).json()
    assert page["messages"][-1]["status"] == "interrupted"
