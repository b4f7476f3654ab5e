"""Property: whatever a client sends (any Unicode, NUL, lone surrogates, astral characters,
bytes that are not UTF-8, huge and deeply nested JSON) to every REST body and query and
every WebSocket frame type, the server answers only with the contract's errors, never a
5xx, stays responsive, and keeps updating the views for other users.

The server runs on a trio loop of its own in a thread (Hypothesis drives blocking calls);
each WebSocket example runs a short trio program of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from app.config import Settings

from .conftest import Server, server_in_thread, web_settings

EXAMPLES = 120
ANSWERS = {200, 201, 202, 400, 404, 409, 413, 429}
FRAMES = {"ack", "ai_response", "tool_activity", "backend_status", "chat_history", "error"}
SETTINGS = hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None,
                               suppress_health_check=list(HealthCheck))

#: Every code point, surrogates and NUL included, with the troublemakers drawn often.
chars = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
short_texts = st.one_of(
    st.text(chars, max_size=40),
    st.lists(st.sampled_from(["\x00", "\ud800", "\udfff", "😀", "𝔘", "\u202e", "a", " ", "\n"]),
             max_size=12).map("".join),
)
texts = st.one_of(short_texts, st.integers(0, 40_000).map(lambda n: "x" * n))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def body_for(fields: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    """A request body: the operation's own fields with any values, any JSON, deep nesting,
    or bytes."""
    objects = st.fixed_dictionaries({}, optional={f: json_values for f in fields}).flatmap(
        lambda known: st.dictionaries(texts, json_values, max_size=2).map(
            lambda extra: {**extra, **known}))
    return st.one_of(
        objects.map(lambda v: json.dumps(v).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.integers(1, 60_000).map(lambda d: nested(d).encode()),
        st.binary(max_size=64),
    )


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    generous = web_settings(settings, messages_per_minute=100_000, concurrent_responses=1000,
                            chats_per_hour=100_000, offline_token_delay_s=0.0)
    with server_in_thread(generous) as server:
        yield server


def assert_contract_answer(r: httpx.Response) -> None:
    assert r.status_code in ANSWERS, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str), r.text


def test_any_rest_input_gets_a_contract_answer(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=30) as c:
        chat_id = c.post("/chat", json={}).json()["id"]
        posts = {"/chat": ("title", "model", "system_prompt"),
                 "/generate": ("message", "chat_id", "client_message_id", "stream"),
                 f"/chat/{chat_id}/stop": ()}
        queries = {"/chats": ("q", "cursor", "limit"), f"/chat/{chat_id}": ("limit", "before_seq"),
                   f"/chat/{chat_id}/events": ("after_seq", "limit"), "/stats": ("chat_id",)}

        @given(path=st.sampled_from(sorted(posts)), data=st.data())
        @SETTINGS
        def post(path: str, data: st.DataObject) -> None:
            body = data.draw(body_for(posts[path]))
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert_contract_answer(r)

        @given(path=st.sampled_from(sorted(queries)), data=st.data())
        @SETTINGS
        def get(path: str, data: st.DataObject) -> None:
            names = queries[path]
            values = st.one_of(short_texts, st.integers().map(str))
            params = data.draw(st.dictionaries(st.sampled_from(names), values, max_size=3))
            query = "&".join(f"{k}={_quote(v)}" for k, v in params.items())
            assert_contract_answer(c.get(f"{path}?{query}"))

        post()
        get()
    assert_still_serving(server)


def _quote(value: str) -> str:
    """Percent-encodes ``value`` as UTF-8, lone surrogates as the bytes a careless client
    would send for them."""
    from urllib.parse import quote

    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def test_any_websocket_frame_gets_contract_frames(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=30) as c:
        chat_id = c.post("/chat", json={}).json()["id"]
    fields = ("message", "chat_id", "client_message_id", "after_seq")
    frame = st.fixed_dictionaries(
        {"event": st.one_of(st.sampled_from(["user_message", "subscribe", "unsubscribe",
                                             "stop"]), texts, json_values)},
        optional={f: st.one_of(json_values, st.just(chat_id)) for f in fields},
    ).map(json.dumps)
    raw = st.one_of(frame, frame, json_values.map(json.dumps),
                    st.integers(1, 60_000).map(nested), st.binary(max_size=64), texts)

    @given(frames=st.lists(raw, min_size=1, max_size=4))
    @SETTINGS
    def exchange(frames: list[str | bytes]) -> None:
        trio.run(_exchange, server, frames)

    exchange()
    assert_still_serving(server)


async def _exchange(server: Server, frames: list[str | bytes]) -> None:
    """Sends ``frames``; every answer is a contract frame and the connection stays open,
    except for a frame above the size limit (closed with 1009)."""
    async with server.websocket() as ws:
        for raw in frames:
            payload = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
            too_big = len(payload) > server.settings.max_frame_bytes
            try:
                await ws.send_message(raw if isinstance(raw, bytes) else
                                      raw.encode("utf-8", "surrogatepass").decode("utf-8",
                                                                                  "replace"))
                await _check_answers(ws)
            except ConnectionClosed as closed:
                assert too_big and closed.reason.code == 1009, closed.reason
                await ws._stream.aclose()
                return
        await ws.send_message(json.dumps({"event": "nonsense"}))
        with trio.fail_after(10):
            while True:  # the connection still answers, after whatever came before
                answer = json.loads(await ws.get_message())
                _check_frame(answer)
                if answer.get("code") == "unknown_event":
                    break


async def _check_answers(ws: Any) -> None:
    with trio.move_on_after(0.05):
        while True:
            _check_frame(json.loads(await ws.get_message()))


def _check_frame(frame: dict[str, Any]) -> None:
    assert frame["event"] in FRAMES, frame
    if frame["event"] == "error":
        assert isinstance(frame["code"], str) and isinstance(frame["message"], str), frame
        assert frame["code"] not in ("internal_error", "actor_crashed"), frame


def assert_still_serving(server: Server) -> None:
    """``/health`` answers within 100 ms once the responses started by the examples are
    done, and the views still update for another user."""
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        deadline = time.monotonic() + 30
        while c.get("/health").json().get("generating", 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            r = c.get("/health")
            timings.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
        assert min(timings) < 0.1, timings
    with httpx.Client(base_url=server.base_url, headers=server.headers("bob"), timeout=30) as c:
        chat = c.post("/chat", json={"title": "after the storm"}).json()
        answer = c.post("/generate", json={"message": "hello", "chat_id": chat["id"]}).json()
        assert answer["message"]["status"] == "complete"
        listed = c.get("/chats").json()["chats"]
        assert listed[0]["id"] == chat["id"] and listed[0]["message_count"] == 2
