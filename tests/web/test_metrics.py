"""``/metrics``: only for the scraper's token, or on a listener of its own; model labels only
from configured names."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from app.config import Settings

from .conftest import Server, eventually, running_server, web_settings


async def test_metrics_answer_the_metrics_token_only(server: Server) -> None:
    for user in ("alice", None):
        async with server.client(user) as c:
            r = await c.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", user
    async with httpx.AsyncClient(base_url=server.base_url,
                                 headers={"Authorization": "Bearer test-metrics-tokeN"}) as c:
        assert (await c.get("/metrics")).status_code == 401
    async with server.scraper() as scraper:
        r = await scraper.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "eventchat_websocket_connections" in r.text


async def test_metrics_are_off_on_the_main_port_without_a_metrics_token(
    settings: Settings,
) -> None:
    async with running_server(web_settings(settings, metrics_token=None)) as server:
        async with server.client() as c:
            r = await c.get("/metrics")
            spec = (await c.get("/openapi.json")).json()
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "EVENTCHAT_METRICS_TOKEN" in r.json()["error"]["message"]
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"metrics": []}]
    assert spec["components"]["securitySchemes"]["metrics"]["scheme"] == "bearer"


async def test_unconfigured_model_names_are_counted_as_other(settings: Settings) -> None:
    s = web_settings(settings, metrics_models=("team-model",),
                     models=("alice-project-X", "team-model"))
    async with running_server(s) as server, server.client() as c, server.scraper() as scraper:
        for model in ("alice-project-X", "team-model"):
            chat_id = (await c.post("/chat", json={"model": model})).json()["id"]
            # a failed response keeps the model the chat asked for (no answering model)
            await c.post("/generate", json={"message": "/fail", "chat_id": chat_id})
        await c.post("/generate", json={"message": "hello"})

        async def observed() -> str | None:
            text = (await scraper.get("/metrics")).text
            return text if text.count("gen_ai_client_operation_duration_seconds_count{") >= 3 \
                else None

        text = await eventually(observed)
    assert "alice-project-X" not in text
    for model in ("other", "team-model", "offline"):
        assert f'gen_ai_response_model="{model}"' in text, model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_metrics_listener_serves_without_a_token(settings: Settings) -> None:
    port = free_port()
    s = web_settings(settings, metrics_token=None, metrics_bind=f"127.0.0.1:{port}")
    async with running_server(s) as server:
        async with server.client() as c:
            await c.post("/generate", json={"message": "hello"})
            assert (await c.get("/metrics")).status_code == 404  # not on the main port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as scraper:

            async def observed() -> Any:
                r = await scraper.get("/metrics")
                return r if "gen_ai_client_token_usage_bucket" in r.text else None

            r = await eventually(observed)
    assert r.headers["content-type"].startswith("text/plain")
    assert "eventchat_websocket_connections" in r.text
    async with httpx.AsyncClient() as c:
        with pytest.raises(httpx.ConnectError):  # the listener closed with the server
            await c.get(f"http://127.0.0.1:{port}/metrics")
