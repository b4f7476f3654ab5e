"""Replay, time travel and export of a real chat, against the real server and upstream.

One chat is recorded while a follower watches it: a tool call and a reply streamed over about
two seconds, a reply stopped midway, a reply that fails. The follower keeps every frame it
gets (with its arrival time) and, after each one, what ``GET /chat/{id}`` showed. Then the
upstream fails any call, and the chat is replayed, read at every seq and exported.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import trio
from openai.types.chat import ChatCompletionMessageParam
from pydantic import TypeAdapter

from tests.fakes.openai_server import ErrorReply, FakeToolCall, StreamReply, fake_openai_server

from .conftest import eventually, receive, running_server, send, turn_done, web_settings

Frame = dict[str, Any]
UNKNOWN = "7c0ffee0-0000-4000-8000-000000000000"
SLOW = [f"w{i} " for i in range(20)]  # 0.1 s apart: streamed over about 2 s


def is_delta(frame: Frame) -> bool:
    return frame["event"] == "ai_response" and not frame["done"]


def signature(frames: list[Frame]) -> list[Any]:
    """What a user sees of frames, in order: each response's consecutive deltas joined into
    one text, the other frames whole (less the server's live counts and the replay mark)."""
    out: list[Any] = []
    for frame in frames:
        if is_delta(frame):
            if out and isinstance(out[-1], tuple) and out[-1][1] == frame["response_id"]:
                out[-1] = ("text", frame["response_id"], out[-1][2] + frame["delta"])
            else:
                out.append(("text", frame["response_id"], frame["delta"]))
            continue
        skip = {"replay", "active_chats", "queue_depth"}
        out.append({k: v for k, v in frame.items() if k not in skip})
    return out


def offsets_hold(frames: list[Frame]) -> bool:
    """Each response's deltas start where the previous one ended (from 0)."""
    sent: dict[str, int] = {}
    for frame in filter(is_delta, frames):
        if frame["offset"] != sent.get(frame["response_id"], 0):
            return False
        sent[frame["response_id"]] = frame["offset"] + len(frame["delta"])
    return True


async def replayed(ws: Any, request: Frame) -> list[Frame]:
    """Sends ``replay`` and returns its frames, ``replay_done`` last."""
    await send(ws, {"event": "replay", **request})
    frames = []
    with trio.fail_after(20):
        while not frames or frames[-1]["event"] != "replay_done":
            frame = await receive(ws)
            assert frame.get("replay") is True, frame
            frames.append(frame)
    return frames


async def test_a_chat_replays_as_it_streamed_and_reads_as_it_was_at_every_seq(
    settings: Any,
) -> None:
    async with fake_openai_server(
        StreamReply([], tool_calls=[FakeToolCall("calculator", {"expression": "12*7"})]),
        StreamReply(SLOW, delay_s=0.1),
        StreamReply([f"s{i} " for i in range(200)], delay_s=0.02),  # stopped after 3 deltas
        StreamReply(["This ", "reply ", "breaks"], error_after=3, delay_s=0.05),
    ) as upstream:
        s = web_settings(settings, provider="openai", openai_base_url=upstream.base_url,
                         openai_api_key="test-key", model="fake-model", max_retries=0,
                         follows_per_connection=1)
        async with running_server(s) as server, server.client() as client:
            chat = await client.post("/chat", json={"title": "Replay",
                                                    "system_prompt": "Be brief."})
            chat_id = chat.json()["id"]
            live: list[tuple[float, Frame]] = []
            views: list[Frame] = []
            async with server.websocket() as follower, server.websocket() as sender:
                await send(follower, {"event": "subscribe", "chat_id": chat_id})
                assert (await receive(follower))["event"] == "chat_history"

                async def record(until: Any, stop_after: int | None = None) -> None:
                    deltas = 0
                    while True:
                        frame = await receive(follower)
                        live.append((trio.current_time(), frame))
                        views.append((await client.get(f"/chat/{chat_id}")).json())
                        deltas += is_delta(frame)
                        if deltas == stop_after:
                            await client.post(f"/chat/{chat_id}/stop")
                        if until(frame):
                            return

                async def turn(message: str, stop_after: int | None = None) -> None:
                    await send(sender, {"message": message, "chat_id": chat_id})
                    await record(turn_done, stop_after)

                await turn("what is 12*7")
                await turn("count slowly", stop_after=3)
                await turn("and fail")
                # an edit of the first question (answered by the upstream's echo), then
                # back to the first branch: the followers' histories come from the views
                await send(sender, {"event": "edit", "chat_id": chat_id, "seq": 2,
                                    "message": "what is 6*7"})
                await record(turn_done)
                await client.post(f"/chat/{chat_id}/branch", json={"seq": 2})
                await record(lambda f: f["event"] == "chat_history" and len(f["messages"]) > 2)

            upstream.default = ErrorReply(500, "no model call may happen in a replay")
            calls = len(upstream.requests)
            log = (await client.get(f"/chat/{chat_id}/events")).json()["events"]
            head = log[-1]["seq"]
            current = await eventually(lambda: views_at(client, chat_id, log[-1]))
            frames = [frame for _, frame in live]

            # -- replay, as fast as possible: what the follower got, again ----------------
            async with server.websocket() as viewer:
                whole = await replayed(viewer, {"chat_id": chat_id, "speed": 0})
                assert whole[-1] == {"event": "replay_done", "chat_id": chat_id,
                                     "last_seq": head, "replay": True}
                assert signature(whole[:-1]) == signature(frames)
                assert offsets_hold(whole) and len(whole) > len(frames)  # chunks, not batches

                # from the middle of a reply: the rest of its text, at its offsets
                batch = next(e for e in log if e["type"] == "TokensGenerated"
                             and e["data"]["offset"] > 0)
                middle = await replayed(viewer, {"chat_id": chat_id, "speed": 0,
                                                 "from_seq": batch["seq"] - 1})
                rest = [f for f in middle if is_delta(f)
                        and f["response_id"] == batch["data"]["response_id"]]
                done = next(f for f in middle if f["event"] == "ai_response" and f["done"])
                assert rest[0]["offset"] == batch["data"]["offset"]
                assert done["message"][rest[0]["offset"]:] == "".join(f["delta"] for f in rest)

                # the first reply alone, at speed 1: its pacing
                first_end = next(e["seq"] for e in log if e["type"] == "ResponseCompleted")
                paced = []
                await send(viewer, {"event": "replay", "chat_id": chat_id, "from_seq": 1,
                                    "to_seq": first_end, "speed": 1})
                while not paced or paced[-1][1]["event"] != "replay_done":
                    paced.append((trio.current_time(), await receive(viewer)))

                # a second replay of the chat replaces the first; a range, a chat, a speed
                # that cannot be replayed get errors in the contract's shape
                await send(viewer, {"event": "replay", "chat_id": chat_id, "speed": 1})
                short = await replayed(viewer, {"chat_id": chat_id, "to_seq": 3, "speed": 0})
                with trio.move_on_after(0.6):
                    extra = await receive(viewer)
                    raise AssertionError(f"the replaced replay went on: {extra}")
                assert short == [{"event": "replay_done", "chat_id": chat_id, "last_seq": 3,
                                  "replay": True}]  # seqs 1-3 (the chat, a message, a
                # reply's start) made no frame; the replaced one made none either
                errors = []
                for bad in ({"chat_id": chat_id, "from_seq": head},
                            {"chat_id": chat_id, "from_seq": 4, "to_seq": 4},
                            {"chat_id": chat_id, "speed": -1},
                            {"chat_id": UNKNOWN}):
                    await send(viewer, {"event": "replay", **bad})
                    errors.append(await receive(viewer))
                # one chat at a time here (follows_per_connection=1): another is refused
                await send(viewer, {"event": "replay", "chat_id": chat_id, "speed": 1})
                await send(viewer, {"event": "replay", "chat_id": UNKNOWN, "speed": 0})
                while (crowded := await receive(viewer))["event"] != "error":
                    assert crowded["replay"] is True
                await send(viewer, {"event": "replay_stop", "chat_id": chat_id})

            # replay_stop ends a replay; the chat's live frames keep flowing, unmarked
            async with server.websocket() as both:
                await send(both, {"event": "subscribe", "chat_id": chat_id})
                await receive(both)
                await send(both, {"event": "replay", "chat_id": chat_id, "speed": 1})
                mixed = [await receive(both)]
                async with server.websocket() as other:
                    await send(other, {"message": "live meanwhile", "chat_id": chat_id})
                    while not any("replay" not in f and turn_done(f) for f in mixed) or sum(
                            "replay" in f for f in mixed) < 4:
                        mixed.append(await receive(both))
                    await send(both, {"event": "replay_stop", "chat_id": chat_id})
                    await send(both, {"event": "unknown"})  # answered after the stop
                    while (await receive(both)).get("code") != "unknown_event":
                        pass
                    after_stop = []
                    with trio.move_on_after(0.6):
                        while True:
                            after_stop.append(await receive(both))
            assert calls == len(upstream.requests) - 1  # only the live turn's call

            # -- time travel at every seq ---------------------------------------------------
            at = {}
            for n in range(1, head + 1):
                answer = await client.get(f"/chat/{chat_id}", params={"at_seq": n})
                assert answer.status_code == 200, answer.text
                at[n] = answer.json()
            refused = [(await client.get(f"/chat/{chat_id}", params={"at_seq": q})).status_code
                       for q in (0, 10_000)]
            stranger = await client.get(f"/chat/{chat_id}", params={"at_seq": 2},
                                        headers=server.headers("bob"))

            # -- export ---------------------------------------------------------------------
            exported = (await client.get(f"/chat/{chat_id}/export",
                                         params={"format": "openai"})).json()
            markdown = (await client.get(f"/chat/{chat_id}/export",
                                         params={"format": "markdown"})).text
            upstream.script(StreamReply(["accepted"]))
            async with openai.AsyncOpenAI(base_url=upstream.base_url, api_key="k",
                                          max_retries=0) as model:
                completion = await model.chat.completions.create(
                    model="fake-model", messages=exported["messages"])

    # the replay showed what the follower saw, with the reply's pacing, and called no model
    assert [f["event"] for f in errors] == ["error"] * 4
    assert [f["code"] for f in errors] == ["invalid_seq_range", "invalid_request",
                                           "invalid_request", "chat_not_found"]
    assert errors[0]["chat_id"] == chat_id and errors[3]["chat_id"] == UNKNOWN
    assert crowded["code"] == "rate_limited" and crowded["chat_id"] == UNKNOWN
    rid = whole[0]["response_id"]
    assert signature([f for _, f in paced if f.get("response_id") == rid]) == signature(
        [f for f in frames if f.get("response_id") == rid])
    live_span = span(live)
    replay_span = span(paced)
    assert 1.5 < live_span and abs(replay_span - live_span) <= 0.2 * live_span, (
        live_span, replay_span)
    assert all(f["replay"] is True for f in mixed if "replay" in f)
    unmarked = [f for f in mixed if "replay" not in f]
    assert [f["status"] for f in unmarked if f["event"] == "ai_response"] == ["failed"]
    assert all("replay" not in f for f in after_stop)

    # every view the follower saw is the chat read at some seq, in order, and every seq
    # shows the text the log held then
    seen = [next(n for n in range(1, head + 1) if at[n] == view) for view in views]
    assert seen == sorted(seen)
    assert any(m["status"] == "streaming" for n in set(seen) for m in at[n]["messages"]
               if m["role"] == "assistant")
    texts: dict[str, str] = {}
    for event in log:
        if event["type"] == "TokensGenerated":
            rid = event["data"]["response_id"]
            texts[rid] = texts.get(rid, "") + event["data"]["text"]
        shown = {m["response_id"]: m["content"] for m in at[event["seq"]]["messages"]
                 if m["role"] == "assistant"}
        assert all(shown[rid] == text for rid, text in texts.items() if rid in shown)
    assert at[head] == current
    assert refused == [400, 400] and stranger.status_code == 404

    # the export is a conversation a model accepts
    messages = exported["messages"]
    TypeAdapter(list[ChatCompletionMessageParam]).validate_python(messages)
    assert completion.choices[0].message.content == "accepted"
    assert [m["role"] for m in messages[:5]] == ["system", "user", "assistant", "tool",
                                                 "assistant"]
    call = messages[2]["tool_calls"][0]
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "12*7"}
    assert messages[3] == {"role": "tool", "tool_call_id": call["id"], "content": "84"}
    assert messages[4]["content"] == "".join(SLOW)
    assert "# Replay" in markdown and "> Be brief." in markdown and "calculator" in markdown
    assert "**stopped**" in markdown and "**failed**" in markdown


async def views_at(client: Any, chat_id: str, last: Frame) -> Frame | None:
    """``GET /chat/{id}`` once the views hold event ``last`` (None before)."""
    page: Frame = (await client.get(f"/chat/{chat_id}")).json()
    return page if page["chat"]["updated_at"] == last["timestamp"] else None


def span(timed: list[tuple[float, Frame]]) -> float:
    """Seconds from the first reply's first delta to its end (``done``)."""
    rid = next(f["response_id"] for _, f in timed if is_delta(f))
    start = next(t for t, f in timed if is_delta(f) and f["response_id"] == rid)
    end = next(t for t, f in timed if f["event"] == "ai_response" and f["done"]
               and f["response_id"] == rid)
    return end - start
