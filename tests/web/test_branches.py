"""Edit, regenerate, branch and fork, end to end: a real server, a real OpenAI-compatible
endpoint that records what the model was sent, real clients over WebSocket and REST."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import trio

from tests.fakes.openai_server import FakeOpenAIServer, StreamReply, fake_openai_server

from .conftest import receive, receive_until, running_server, send, web_settings

Frames = list[dict[str, Any]]
#: The messages, edits and regenerates the test has admitted by its end: the user's limit.
ADMITTED = 11


def numbered_replies() -> Any:
    count = itertools.count(1)
    return lambda body: StreamReply([f"answer {next(count)}"])


def turn_ended(frame: dict[str, Any]) -> bool:
    return frame["event"] == "chat_history" and any(
        m["role"] == "assistant" and m["status"] != "streaming" for m in frame["messages"])


async def turn(ws: Any, frame: dict[str, Any]) -> tuple[dict[str, Any], Frames]:
    """Sends ``frame``; its ``ack`` and the turn's frames up to its ``chat_history``."""
    await send(ws, frame)
    ack = await receive(ws)
    assert ack["event"] == "ack", ack
    return ack, await receive_until(ws, turn_ended)


def context(upstream: FakeOpenAIServer) -> list[str]:
    """What the model was last sent, as ``role: content`` lines."""
    return [f"{m['role']}: {m['content']}" for m in upstream.requests[-1]["messages"]]


async def events(http: httpx.AsyncClient, chat_id: str) -> Frames:
    return (await http.get(f"/chat/{chat_id}/events?limit=1000")).json()["events"]  # type: ignore[no-any-return]


async def branch(http: httpx.AsyncClient, chat_id: str) -> list[tuple[str, str, list[int]]]:
    page = (await http.get(f"/chat/{chat_id}")).json()
    return [(m["role"], m["content"], m["siblings"]) for m in page["messages"]]


async def test_edit_regenerate_branch_and_fork(settings: Any) -> None:
    async with fake_openai_server(default=numbered_replies()) as upstream:
        s = web_settings(settings, provider="openai", openai_base_url=upstream.base_url,
                         openai_api_key="test-key", model="fake-model", max_retries=0,
                         messages_per_minute=ADMITTED)
        async with running_server(s) as server, server.websocket() as ws, \
                server.client() as http:
            await check_branches(ws, http, server.client("bob"), upstream)


async def check_branches(ws: Any, http: httpx.AsyncClient, stranger: httpx.AsyncClient,
                         upstream: FakeOpenAIServer) -> None:
    ack, frames = await turn(ws, {"message": "q1"})
    cid = ack["chat_id"]
    seqs = {"q1": ack["seq"]}
    for text in ("q2", "q3"):
        ack, frames = await turn(ws, {"message": text, "chat_id": cid})
        seqs[text] = ack["seq"]
    line = (await http.get(f"/chat/{cid}")).json()["messages"]
    a = {m["content"]: m["seq"] for m in line if m["role"] == "assistant"}
    parents = [None, *(m["seq"] for m in line[:-1])]  # one line: each follows the one before
    assert [(m["parent_seq"], m["siblings"]) for m in line] == [
        (parent, [m["seq"]]) for parent, m in zip(parents, line, strict=True)]
    assert frames[-1]["messages"] == line[-2:]  # the turn's history: as the views hold it
    grown: list[int] = []  # events each edit or regenerate added
    count = len(await events(http, cid))

    async def changed(frame: dict[str, Any]) -> tuple[dict[str, Any], Frames]:
        nonlocal count
        result = await turn(ws, {**frame, "chat_id": cid})
        now = len(await events(http, cid))
        grown.append(now - count)
        count = now
        return result

    # regenerate the last reply (depth 5): a sibling of "answer 3", the model sees the line
    ack, frames = await changed({"event": "regenerate", "client_message_id": "r-1"})
    assert context(upstream) == ["user: q1", "assistant: answer 1", "user: q2",
                                 "assistant: answer 2", "user: q3"]
    user, reply = frames[-1]["messages"]
    assert (user["content"], reply["content"]) == ("q3", "answer 4")
    assert reply["parent_seq"] == user["seq"]
    assert reply["siblings"] == [a["answer 3"], reply["seq"]]
    a["answer 4"] = reply["seq"]
    assert frames[-2]["event"] == "backend_status"
    # a re-sent regenerate creates nothing
    await send(ws, {"event": "regenerate", "chat_id": cid, "client_message_id": "r-1"})
    again = await receive(ws)
    assert (again["event"], again["seq"]) == ("ack", ack["seq"])
    await receive_until(ws, turn_ended)

    # regenerate the first reply (depth 1): the branch is q1 and the new reply only
    await changed({"event": "regenerate", "seq": a["answer 1"]})
    assert context(upstream) == ["user: q1"]
    page = await branch(http, cid)
    assert [(r, c) for r, c, _ in page] == [("user", "q1"), ("assistant", "answer 5")]
    assert page[1][2][0] == a["answer 1"] and len(page[1][2]) == 2
    at_fork = count  # the fork below copies the chat as it is now

    # edit q2 (depth 2, off the active branch): a sibling of q2 under "answer 1"
    ack, frames = await changed({"event": "edit", "seq": seqs["q2"], "message": "q2 edited"})
    assert context(upstream) == ["user: q1", "assistant: answer 1", "user: q2 edited"]
    assert await branch(http, cid) == [
        ("user", "q1", [seqs["q1"]]), ("assistant", "answer 1", page[1][2]),
        ("user", "q2 edited", [seqs["q2"], ack["seq"]]),
        ("assistant", "answer 6", [ack["seq"] + 1]),
    ]
    edited = frames[-1]["messages"][0]
    assert (edited["parent_seq"], edited["siblings"]) == (a["answer 1"], [seqs["q2"], ack["seq"]])

    # edit the first message (depth 0), over WebSocket, then over REST
    ack, _ = await changed({"event": "edit", "seq": seqs["q1"], "message": "q1 again"})
    assert context(upstream) == ["user: q1 again"]
    answer = await http.post(f"/chat/{cid}/edit", json={"seq": seqs["q1"], "message": "q1 third"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"]["content"] == "answer 8"
    assert context(upstream) == ["user: q1 third"]
    page = await branch(http, cid)
    assert page[0][1] == "q1 third" and page[0][2] == [seqs["q1"], ack["seq"], ack["seq"] + 4]
    answer = await http.post(f"/chat/{cid}/regenerate", json={})
    assert answer.json()["message"]["content"] == "answer 9"
    assert answer.json()["message"]["siblings"][-1] == answer.json()["message"]["seq"]
    assert context(upstream) == ["user: q1 third"]
    now = len(await events(http, cid))
    grown += [(now - count) // 2] * 2  # the two REST requests
    count = now

    # switch back to q3's branch: its newest deepest descendant ("answer 4") is the leaf
    switched = await http.post(f"/chat/{cid}/branch", json={"seq": seqs["q3"]})
    assert switched.status_code == 200, switched.text
    shown = [(m["content"], m["siblings"]) for m in switched.json()["messages"]]
    assert [text for text, _ in shown] == ["q1", "answer 1", "q2", "answer 2", "q3", "answer 4"]
    assert shown[0][1] == page[0][2] and shown[5][1] == [a["answer 3"], a["answer 4"]]
    # a follower got the REST requests' turns, then is shown the branch
    followed = (await receive_until(ws, lambda f: f["event"] == "chat_history"
                                    and len(f["messages"]) == len(shown)))[-1]
    assert [m["content"] for m in followed["messages"]] == [text for text, _ in shown]
    await turn(ws, {"message": "q4", "chat_id": cid})
    assert context(upstream) == ["user: q1", "assistant: answer 1", "user: q2",
                                 "assistant: answer 2", "user: q3", "assistant: answer 4",
                                 "user: q4"]
    count = len(await events(http, cid))

    # storage grows by the same few events per edit or regenerate, whatever its depth
    assert grown == [4] * 6, grown

    # refused requests get the contract's errors and change nothing
    await send(ws, {"event": "edit", "chat_id": cid, "seq": a["answer 1"], "message": "x"})
    assert (await receive(ws))["code"] == "message_not_found"
    await send(ws, {"event": "regenerate", "chat_id": cid, "seq": seqs["q1"]})
    assert (await receive(ws))["code"] == "message_not_found"
    await send(ws, {"event": "edit", "chat_id": cid, "seq": seqs["q1"], "message": " "})
    assert (await receive(ws))["code"] == "empty_message"
    await send(ws, {"event": "edit", "chat_id": cid, "message": "no seq"})
    assert (await receive(ws))["code"] == "invalid_request"
    refused = await http.post(f"/chat/{cid}/branch", json={"seq": 10_000})
    assert (refused.status_code, refused.json()["error"]["code"]) == (400, "message_not_found")
    async with stranger:
        for path, body in (("regenerate", {}), ("branch", {"seq": 2}), ("fork", {"at_seq": 2}),
                           ("edit", {"seq": 2, "message": "mine"})):
            theirs = await stranger.post(f"/chat/{cid}/{path}", json=body)
            assert theirs.status_code == 404, (path, theirs.text)
    assert len(await events(http, cid)) == count

    # a fork holds the active branch as it was at that event, and goes on by itself
    log = await events(http, cid)
    forked = await http.post(f"/chat/{cid}/fork", json={"at_seq": at_fork})
    assert forked.status_code == 201, forked.text
    fork = forked.json()
    assert fork["forked_from"] == {"chat_id": cid, "seq": at_fork,
                                   "hash": log[at_fork - 1]["hash"]}
    assert [(r, c) for r, c, _ in await branch(http, fork["id"])] == [
        ("user", "q1"), ("assistant", "answer 5")]
    await turn(ws, {"message": "in the fork", "chat_id": fork["id"]})
    assert context(upstream) == ["user: q1", "assistant: answer 5", "user: in the fork"]
    assert len(await events(http, cid)) == count
    assert json.dumps(await events(http, cid)).count("in the fork") == 0
    with trio.fail_after(5):
        assert (await http.get(f"/chat/{cid}/audit")).json()["valid"] is True

    # edits and regenerates count as messages against the user's per-minute limit
    await send(ws, {"event": "regenerate", "chat_id": cid})
    assert (await receive(ws))["code"] == "rate_limited"
    limited = await http.post(f"/chat/{cid}/edit", json={"seq": seqs["q1"], "message": "more"})
    assert limited.status_code == 429 and limited.headers["Retry-After"]
    assert len(await events(http, cid)) == count
