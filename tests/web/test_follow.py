"""``GET /chat/{id}/stream``: SSE follow on a real server, resumed with ``Last-Event-ID``."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from app.config import Settings

from .conftest import (
    Server,
    eventually,
    receive_until,
    running_server,
    send,
    turn_done,
    web_settings,
)

ID = re.compile(r"\d+:\d+")


class SseClient:
    """An SSE follower over a plain TCP connection (h11 parses the HTTP), so that leaving
    is just closing the socket, as a browser tab does."""

    def __init__(self, server: Server, path: str, headers: dict[str, str]) -> None:
        self.server, self.path, self.headers = server, path, headers
        self.status = 0
        self.content_type = ""
        self._stream: trio.SocketStream | None = None
        self._http = h11.Connection(h11.CLIENT)
        self._buffer = ""

    async def __aenter__(self) -> SseClient:
        host, port = urlsplit(self.server.base_url).netloc.split(":")
        self._stream = await trio.open_tcp_stream(host, int(port))
        request = h11.Request(method="GET", target=self.path,
                              headers=[("Host", host), *self.headers.items()])
        await self._stream.send_all(self._http.send(request) + self._http.send(h11.EndOfMessage()))
        while True:
            event = await self._next()
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.content_type = dict(event.headers).get(b"content-type", b"").decode()
                return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._stream is not None
        await self._stream.aclose()

    async def _next(self) -> Any:
        assert self._stream is not None
        while True:
            event = self._http.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._http.receive_data(await self._stream.receive_some(65536))

    async def body(self) -> bytes:
        chunks = []
        while not isinstance(event := await self._next(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
        return b"".join(chunks)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The events as they arrive: ``{"id", "event", "frame"}``, and ``{"comment"}``."""
        while True:
            while "\n\n" not in self._buffer:
                event = await self._next()
                assert isinstance(event, h11.Data), event
                self._buffer += bytes(event.data).decode()
            block, self._buffer = self._buffer.split("\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line.startswith(":"):
                    yield {"comment": line[1:].strip()}
                else:
                    name, _, value = line.partition(": ")
                    fields[name] = value
            if fields:
                yield {"id": fields.get("id"), "event": fields["event"],
                       "frame": json.loads(fields["data"])}


async def events_until(events: AsyncIterator[dict[str, Any]], name: str
                       ) -> list[dict[str, Any]]:
    """Events up to and including the first one named ``name``."""
    seen = []
    with trio.fail_after(10):
        async for event in events:
            seen.append(event)
            if event.get("event") == name:
                return seen
    raise AssertionError(f"the stream ended before {name}")


def is_turn_end(event: dict[str, Any]) -> bool:
    return "frame" in event and turn_done(event["frame"])


async def subscriptions(server: Server) -> int:
    async with server.scraper() as c:
        text = (await c.get("/metrics")).text
    found = re.search(r"^eventchat_chat_subscriptions (\S+)$", text, re.M)
    assert found is not None
    return int(float(found[1]))


async def read_turn(client: SseClient, into: list[dict[str, Any]]) -> None:
    """Reads events into ``into`` up to the end of a turn."""
    async with aclosing(client.events()) as events:
        async for event in events:
            into.append(event)
            if is_turn_end(event):
                return


def text_of(events: list[dict[str, Any]], start: int = 0) -> tuple[str, list[int]]:
    """The text of the deltas in order (from offset ``start``), checking each starts where
    the last ended."""
    text, offsets = "", []
    for e in events:
        frame = e.get("frame", {})
        if frame.get("event") == "ai_response" and not frame["done"]:
            assert frame["offset"] == start + len(text), (frame["offset"], start + len(text))
            offsets.append(frame["offset"])
            text += frame["delta"]
    return text, offsets


async def test_sse_follow_resume_and_websocket_turn(settings: Settings) -> None:
    s = web_settings(settings, sse_keepalive_s=0.2, approval_tools=("calculator",))
    async with running_server(s) as server, server.client() as c:
        chat_id = (await c.post("/chat", json={})).json()["id"]
        url = f"/chat/{chat_id}/stream"
        # the rules of the other routes: the token, someone else's chat, a bad id
        async with server.client(None) as anon:
            assert (await anon.get(url)).status_code == 401
        async with server.client("bob") as bob:
            r = await bob.get(url)
            assert r.status_code == 404 and r.json()["error"]["code"] == "chat_not_found"
        r = await c.get(url, headers={"Last-Event-ID": "seven"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_last_event_id"
        r = await c.get(url, headers={"Last-Event-ID": "999:0"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_last_event_id"

        whole: list[dict[str, Any]] = []
        bearer = server.headers()
        query = f"{url}?access_token={server.tokens['alice']}"
        async with SseClient(server, query, {}) as full, trio.open_nursery() as nursery, \
                server.websocket() as ws:
            nursery.start_soon(read_turn, full, whole)
            async with SseClient(server, url, bearer) as part:
                assert full.status == 200 and part.status == 200
                assert part.content_type.startswith("text/event-stream")
                async with aclosing(part.events()) as events:
                    first = await events.__anext__()
                    assert first["event"] == "chat_history"
                    assert first["frame"]["messages"] == []
                    await trio.sleep(0.3)  # quiet: keep-alive comments
                    await send(ws, {"event": "user_message", "chat_id": chat_id,
                                    "message": "/tokens 1000", "client_message_id": "w1"})
                    seen = [first]
                    async for event in events:  # part of the reply, keep-alives included
                        seen.append(event)
                        if len(text_of(seen)[0]) > 200:
                            break
                last_id = next(e["id"] for e in reversed(seen) if "id" in e)
                before = await subscriptions(server)

            async def released() -> bool:
                return await subscriptions(server) == before - 1

            await eventually(released)  # the client went away mid-reply: released
            running = (await c.get(f"/chat/{chat_id}")).json()["messages"][-1]
            assert running["status"] == "streaming"  # the reply goes on meanwhile
            resumed: list[dict[str, Any]] = []
            async with SseClient(server, url, {**bearer, "Last-Event-ID": last_id}) as again:
                await read_turn(again, resumed)
            sent_by_ws = await receive_until(ws, turn_done)
        assert all(ID.fullmatch(e["id"]) for e in seen + resumed + whole if "id" in e)
        assert not any(e["event"] == "chat_history" for e in resumed[:-1])
        text, offsets = text_of(seen + resumed)
        stored = (await c.get(f"/chat/{chat_id}")).json()["messages"][-1]
        assert stored["status"] == "complete" and text == stored["content"]
        offset = int(last_id.split(":")[1])
        assert text_of(resumed, offset)[1][0] == offset  # taken up where it was left
        done = [e["frame"] for e in resumed if e["event"] == "ai_response" and e["frame"]["done"]]
        assert len(done) == 1 and done[0]["message"] == text
        # the other SSE follower got the frames the WebSocket sender got, ack aside
        assert text_of(whole)[0] == text
        ws_frames = [f for f in sent_by_ws if f["event"] != "ack"]
        assert [f["event"] for f in ws_frames if f["event"] != "ai_response"] == \
               [e["event"] for e in whole if "frame" in e and e["event"] != "ai_response"][1:]
        assert whole[-1]["frame"]["messages"] == ws_frames[-1]["messages"]
        assert any(e.get("comment") == "keep-alive" for e in seen + whole)
        # resumed from the middle of the reply once it has ended: the rest, from the log
        middle = next(e for e in seen if e.get("event") == "ai_response")
        later: list[dict[str, Any]] = []
        async with SseClient(server, url, {**bearer, "Last-Event-ID": middle["id"]}) as late:
            await read_turn(late, later)
        start = int(middle["id"].split(":")[1])
        assert text_of(later, start)[0] == text[start:]
        assert [e["event"] for e in later if not e["event"] == "ai_response"] == \
               ["backend_status", "chat_history"]
        assert later[-1]["frame"]["messages"] == whole[-1]["frame"]["messages"]
        assert [e["frame"]["message"] for e in later if e["frame"].get("done")] == [text]

        # a tool call waiting for approval: shown to a follower that joins, not again to one
        # that resumes after it
        async with server.websocket() as ws, SseClient(server, url, bearer) as watcher:
            async with aclosing(watcher.events()) as events:
                await send(ws, {"event": "user_message", "chat_id": chat_id,
                                "message": "what is 6*7", "client_message_id": "w2"})
                asked = await events_until(events, "tool_approval")
            async with SseClient(server, url, bearer) as joining:
                async with aclosing(joining.events()) as events:
                    opening = [await events.__anext__(), await events.__anext__()]
            assert [e["event"] for e in opening] == ["chat_history", "tool_approval"]
            assert opening[1]["frame"] == asked[-1]["frame"]
            after: list[dict[str, Any]] = []
            headers = {**bearer, "Last-Event-ID": asked[-1]["id"]}
            async with SseClient(server, url, headers) as back, trio.open_nursery() as nursery:
                nursery.start_soon(read_turn, back, after)
                await trio.sleep(0.2)
                decision = {"call_id": asked[-1]["frame"]["call_id"], "approve": True}
                r = await c.post(f"/chat/{chat_id}/tool-decision", json=decision)
                assert r.status_code == 200, r.text
        assert "tool_approval" not in [e.get("event") for e in after]
        assert "42" in after[-1]["frame"]["messages"][-1]["content"]

        async def none_left() -> bool:
            return await subscriptions(server) == 0

        await eventually(none_left)
