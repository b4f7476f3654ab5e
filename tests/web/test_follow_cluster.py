"""SSE follow across two servers on one PostgreSQL: a reply followed on one server and
resumed on the other with ``Last-Event-ID`` is whole, each character once."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import pytest

from app.config import Settings

from .conftest import receive_until, running_server, send, turn_done, web_settings
from .test_follow import SseClient, read_turn, text_of


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_follow_resumes_on_another_server(settings: Settings) -> None:
    s = web_settings(settings)
    async with running_server(s) as one, running_server(s) as two, one.client() as c:
        chat_id = (await c.post("/chat", json={})).json()["id"]
        url = f"/chat/{chat_id}/stream"
        async with one.websocket() as driver:
            async with SseClient(one, url, one.headers()) as part:
                async with aclosing(part.events()) as events:
                    seen = [await events.__anext__()]
                    await send(driver, {"event": "user_message", "chat_id": chat_id,
                                        "message": "/tokens 800", "client_message_id": "d1"})
                    async for event in events:
                        seen.append(event)
                        if len(text_of(seen)[0]) > 150:
                            break
            last_id = next(e["id"] for e in reversed(seen) if "id" in e)
            resumed: list[dict[str, Any]] = []
            headers = {**two.headers(), "Last-Event-ID": last_id}
            async with SseClient(two, url, headers) as again:
                assert again.status == 200
                await read_turn(again, resumed)
            await receive_until(driver, turn_done)
        text, _ = text_of(seen + resumed)
        stored = (await c.get(f"/chat/{chat_id}")).json()["messages"][-1]
        assert stored["status"] == "complete" and text == stored["content"]
        done = [e["frame"] for e in resumed if e["event"] == "ai_response" and e["frame"]["done"]]
        assert [d["message"] for d in done] == [text]
