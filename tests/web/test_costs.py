"""What one new chat over the WebSocket costs before its ``ack``, counted at the seams: reads
of the event log (the recorder's ``select_events``: aggregate loads and event reads alike),
the views' chat lookups and the actors' mailbox round trips (``ActorSystem.ask``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from app.config import Settings
from app.storage.users import add_user
from app.web.app import create_app
from app.web.services import Services

from .conftest import web_settings


def count_reads(obj: object, name: str, counts: Counter[str], label: str) -> None:
    """Wraps the blocking method ``obj.name`` so that each call adds one to ``label``."""
    method: Callable[..., Any] = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[label] += 1
        return method(*args, **kwargs)

    setattr(obj, name, counted)


def count_calls(obj: object, name: str, counts: Counter[str], label: str) -> None:
    """Wraps the coroutine method ``obj.name`` so that each call adds one to ``label``."""
    method: Callable[..., Awaitable[Any]] = getattr(obj, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        counts[label] += 1
        return await method(*args, **kwargs)

    setattr(obj, name, counted)


async def test_a_new_chat_costs_one_mailbox_round_trip_and_no_log_read(
    settings: Settings,
) -> None:
    s = web_settings(settings, recovery_interval_s=3600.0)
    token = await trio.to_thread.run_sync(add_user, s, "alice")
    app = create_app(s, grace_s=0.5)
    counts: Counter[str] = Counter()
    with trio.fail_after(30):
        async with app.test_app() as test_app:
            svc: Services = app.extensions["eventchat"]
            count_reads(svc.store.app.recorder, "select_events", counts, "log reads")
            count_calls(svc.views, "get_chat", counts, "views reads")
            count_calls(svc.system, "ask", counts, "mailbox round trips")
            headers = {"Authorization": f"Bearer {token}"}
            async with test_app.test_client().websocket("/ws/chat", headers=headers) as ws:
                await ws.send(json.dumps({"event": "user_message", "message": "hello",
                                          "client_message_id": "m-1"}))
                frame = json.loads(await ws.receive())
                before_ack = dict(counts)
                assert frame["event"] == "ack" and frame["seq"] == 2
                while not (frame["event"] == "ai_response" and frame["done"]):
                    frame = json.loads(await ws.receive())
    assert before_ack.get("log reads", 0) <= 1
    assert before_ack.get("mailbox round trips", 0) <= 1
    assert before_ack.get("views reads", 0) == 0
