"""A seeded random workload of every kind of turn, for rebuild and crash tests."""

from __future__ import annotations

import random

from app.events.domain import ChatSession

from .conftest import timing, usage


def random_turn(chat: ChatSession, rng: random.Random, n: int) -> None:
    """Adds one turn of a random kind (may leave a response streaming)."""
    if chat.current is not None:
        if rng.random() < 0.5:
            chat.interrupt_response("restarted")
        else:
            rid = chat.current.response_id
            chat.record_tokens(rid, f" more{n}", 1)
            chat.complete_response(rid, "m-late", "stop", usage(), timing(tps=rng.uniform(1, 99)))
            return
    if rng.random() < 0.1:
        chat.rename(f"renamed {n}")
    branch(chat, rng, n)
    rid = chat.start_response(rng.choice(["m1", "m2"]), "offline")
    for k in range(rng.randint(0, 4)):
        chat.record_tokens(rid, f"tok{k} ", 1)
    if rng.random() < 0.3:
        chat.invoke_tool(rid, f"call{n}", rng.choice(["calculator", "clock"]), {"n": n})
        if rng.random() < 0.7:
            chat.complete_tool(rid, f"call{n}", {"value": n}, rng.uniform(0.1, 9.9))
        else:
            chat.fail_tool(rid, f"call{n}", "nope", rng.uniform(0.1, 9.9))
    t = timing(rng.uniform(1, 300), rng.uniform(10, 5000), rng.uniform(1, 99))
    ending = rng.random()
    if ending < 0.6:
        chat.complete_response(rid, "m1", "stop", usage(rng.randint(1, 50), rng.randint(1, 50)), t)
    elif ending < 0.7:
        chat.fail_response(rid, {"code": "upstream_error", "message": "x"}, usage(), t)
    elif ending < 0.8:
        chat.stop_response(rid, usage(), t)
    elif ending < 0.9:
        chat.interrupt_response("crash")
    # else: left streaming


def branch(chat: ChatSession, rng: random.Random, n: int) -> None:
    """Asks for an answer: a new message, or an edit of a user message, or a regenerate of
    a reply, anywhere in the tree, sometimes after switching to another branch."""
    tree = chat.tree()
    users = sorted(s for s, node in tree.nodes.items() if node.role == "user")
    replies = sorted(s for s, node in tree.nodes.items() if node.role == "assistant")
    kind = rng.random()
    if users and kind < 0.15:
        chat.receive_message(f"edit {n} of soup", None, edit_of=rng.choice(users))
    elif replies and kind < 0.3:
        chat.regenerate(rng.choice(replies), f"r{n}" if rng.random() < 0.5 else None)
    else:
        if replies and kind < 0.4:
            chat.select_branch(rng.choice(sorted(tree.nodes)))
        chat.receive_message(f"message {n} about {rng.choice(['cats', 'trains', 'soup'])}",
                             f"c{n}" if rng.random() < 0.5 else None)


def make_chats(rng: random.Random, count: int) -> list[ChatSession]:
    return [ChatSession.start(owner=rng.choice(["alice", "bob", "carol"]), title=f"chat {i}",
                              model=rng.choice([None, "m1"])) for i in range(count)]
