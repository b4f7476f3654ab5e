"""Two servers on one PostgreSQL: a chat followed on one and driven on the other (guarantee 5)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from .conftest import running_server, web_settings


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def frames_until(ws: Any, stop: Any) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with trio.fail_after(15):
        while not frames or not stop(frames[-1]):
            frames.append(json.loads(await ws.get_message()))
    return frames


def finished(frame: dict[str, Any]) -> bool:
    return frame["event"] == "ai_response" and frame["done"]


async def test_followers_on_another_server_receive_every_frame_and_can_stop(settings: Any) -> None:
    s = web_settings(settings, offline_token_delay_s=0.01)
    async with running_server(s) as one, running_server(s) as two:
        async with one.websocket() as driver, two.websocket() as follower:
            await driver.send_message(json.dumps({"message": "what is 12*7"}))
            ack = json.loads(await driver.get_message())
            chat_id = ack["chat_id"]
            await follower.send_message(json.dumps({"event": "subscribe", "chat_id": chat_id}))
            seen = await frames_until(follower, finished)
            driven = await frames_until(driver, finished)

            text = ""
            for frame in seen:
                if frame["event"] == "ai_response" and not frame["done"]:
                    assert frame["offset"] == len(text)
                    text += frame["delta"]
            assert text == seen[-1]["message"] == driven[-1]["message"]
            assert "84" in text and seen[-1]["status"] == "complete"

            # a stop sent to the other server ends the response where it runs
            await follower.send_message(json.dumps(
                {"message": "/slow", "chat_id": chat_id, "client_message_id": "slow"}
            ))
            await frames_until(follower, lambda f: f["event"] == "ai_response")
            await follower.send_message(json.dumps({"event": "stop", "chat_id": chat_id}))
            ended = await frames_until(follower, finished)
            assert ended[-1]["status"] == "stopped"
            assert len(ended[-1]["message"]) < 600
