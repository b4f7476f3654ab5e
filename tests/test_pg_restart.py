"""PostgreSQL itself stopped, started and restarted under a running server.

While it is down, every request is answered in time (``/health`` 503 within its deadline,
``POST /generate`` 503 with ``Retry-After`` within the store timeout) and the liveness check
stays 200; once it is back, the server recovers by itself, in-flight replies end, and no
acknowledged message is lost.

These tests stop the whole PostgreSQL server, disturbing every other client of it: they run
only when asked (``EVENTCHAT_PG_RESTART_TESTS=1``, or ``EVENTCHAT_REQUIRE_POSTGRES=1`` in CI),
as root (``pg_ctlcluster``), never alongside other tests using PostgreSQL, and always leave
it running.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from app.config import Settings
from tests.web.conftest import running_server, web_settings
from tests.web.test_store_faults import (
    MARGIN_S,
    HealthLog,
    Streams,
    assert_store_unavailable,
    check_nothing_lost,
    recovered,
    timed,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("store_kind", [pytest.param("postgres",
                                                        marks=pytest.mark.postgres)]),
]
CLUSTER = ("15", "main")
STORE_TIMEOUT_S = 2.0


@pytest.fixture(autouse=True)
def restarts_allowed() -> None:
    asked = "1" in (os.environ.get("EVENTCHAT_PG_RESTART_TESTS"),
                    os.environ.get("EVENTCHAT_REQUIRE_POSTGRES"))
    if not asked:
        pytest.skip("stops PostgreSQL for every client: set EVENTCHAT_PG_RESTART_TESTS=1"
                    " and run it alone")
    if os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None:
        pytest.skip("needs root and pg_ctlcluster to stop and start PostgreSQL")


async def pg_ctl(action: str) -> None:
    with trio.fail_after(60):
        await trio.run_process(["pg_ctlcluster", *CLUSTER, action])


async def ensure_running() -> None:
    """Starts PostgreSQL unless it runs (``start`` then fails, and that is fine)."""
    with trio.CancelScope(shield=True), trio.fail_after(60):
        await trio.run_process(["pg_ctlcluster", *CLUSTER, "start"], check=False,
                               capture_stderr=True)


@asynccontextmanager
async def postgres_stopped() -> AsyncIterator[None]:
    """PostgreSQL stopped for the block, and started again whatever happens."""
    try:
        await pg_ctl("stop")
        yield
    finally:
        await ensure_running()


async def test_postgres_stopped_then_started(settings: Settings) -> None:
    s = web_settings(settings, store_timeout_s=STORE_TIMEOUT_S)
    bound = s.store_timeout_s + MARGIN_S
    async with running_server(s) as server, server.client() as c, \
            server.client(None) as anyone:
        chat_id = (await c.post("/generate", json={"message": "before"})).json()["chat_id"]
        async with postgres_stopped():
            with trio.fail_after(bound):
                health, took = await timed(anyone.get("/health"))
            print(f"PostgreSQL stopped: /health {health.status_code} after {took:.2f} s")
            assert health.status_code == 503 and health.json()["status"] == "unavailable"
            assert took < min(3.0, s.store_timeout_s) + 0.5
            assert (await anyone.get("/health/live")).status_code == 200
            for request in (c.post("/generate", json={"message": "new chat"}),
                            c.post("/generate", json={"message": "m", "chat_id": chat_id}),
                            c.get("/chats")):
                with trio.fail_after(bound):
                    r, took = await timed(request)
                print(f"PostgreSQL stopped: {r.request.method} {r.request.url.path}"
                      f" {r.status_code} after {took:.2f} s")
                assert_store_unavailable(r)
            started = trio.current_time()
        took = await recovered(server, started)
        print(f"PostgreSQL started: ready again {took:.2f} s later")
        # the store and the views are back within a second; the live channel waits up to
        # 5 s between two attempts to connect again
        assert took < 8.0
        answer = await c.post("/generate", json={"message": "after", "chat_id": chat_id})
        assert answer.json()["message"]["status"] == "complete"


async def test_postgres_restarted_under_load(settings: Settings) -> None:
    s = web_settings(settings, store_timeout_s=STORE_TIMEOUT_S, concurrent_responses=10)
    async with running_server(s) as server:
        streams, health = Streams(server, 3, 2000), HealthLog(server)
        async with trio.open_nursery() as nursery:
            await streams.run(nursery)
            nursery.start_soon(health.poll)
            restarting = time.monotonic()
            try:
                await pg_ctl("restart")
            finally:
                await ensure_running()
            restarted = trio.current_time()
            took = await recovered(server, restarted)
            print(f"PostgreSQL restarted in {time.monotonic() - restarting:.2f} s;"
                  f" ready again {took:.2f} s later; /health said {sorted(health.statuses())}")
            assert took < 5.0
            with trio.fail_after(30):
                while len(streams.endings) < streams.count:  # noqa: ASYNC110 - other tasks
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        print(f"the replies ended: {streams.endings}")
        assert health.statuses() & {"degraded", "unavailable"}, health.seen
        await check_nothing_lost(server, streams)
