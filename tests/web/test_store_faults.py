"""A store that does not answer, or answers with errors, on a real server: every request is
answered within the store timeout (a 503 ``store_unavailable`` with ``Retry-After``), the
health checks tell the truth meanwhile, and everything recovers by itself once the fault is
gone, with no acknowledged message lost."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from functools import partial
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
import trio

from app.config import Settings
from app.events.application import ChatApplication
from app.storage.postgres import application_name
from app.storage.recorder import persistence_env

from .conftest import Server, eventually, receive, running_server, send, web_settings

#: Seconds allowed beyond the store timeout (scheduling, the HTTP round trip).
MARGIN_S = 1.5
pg_only = pytest.mark.parametrize("store_kind", [pytest.param("postgres",
                                                              marks=pytest.mark.postgres)])


@asynccontextmanager
async def held(fault: Callable[[], AbstractContextManager[Any]]) -> AsyncIterator[None]:
    """Holds ``fault()`` (a blocking context: a lock taken from another connection) in a
    worker thread for the block."""
    entered, release = trio.Event(), trio.Event()

    def hold() -> None:
        with fault():
            trio.from_thread.run_sync(entered.set)
            trio.from_thread.run(release.wait)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.to_thread.run_sync, hold))
        await entered.wait()
        try:
            yield
        finally:
            release.set()


@contextmanager
def log_locked(settings: Settings) -> Iterator[None]:
    """The event log locked by another connection: on SQLite writes wait and then fail
    (readers go on, in WAL mode); on PostgreSQL reads wait too."""
    if settings.database_url:
        with psycopg.connect(settings.database_url) as conn:
            conn.execute(f'LOCK TABLE "{settings.database_schema}".eventchat_events'
                         " IN ACCESS EXCLUSIVE MODE")
            yield
            conn.rollback()
    else:
        conn = sqlite3.connect(settings.data_dir / "events.sqlite", isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()


@contextmanager
def everything_locked(settings: Settings) -> Iterator[None]:
    """Every table of the schema locked by another connection: a server that hangs."""
    assert settings.database_url
    with psycopg.connect(settings.database_url) as conn:
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s",
                              (settings.database_schema,)).fetchall()
        for (table,) in tables:
            conn.execute(f'LOCK TABLE "{settings.database_schema}"."{table}"'
                         " IN ACCESS EXCLUSIVE MODE")
        yield
        conn.rollback()


def leave_response_open(settings: Settings, chat_id: str) -> None:
    """Records a message and the start of its answer, as a server that died would leave
    them: the chat's next actor must record the answer's end before it serves."""
    app = ChatApplication(env=persistence_env(settings))
    try:
        chat = app.get_chat(UUID(chat_id))
        chat.receive_message("left open", None, 1000)
        chat.start_response("offline", "offline", "r-left-open")
        app.save(chat)
    finally:
        app.close()


def assert_store_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "store_unavailable", r.text
    assert int(r.headers["Retry-After"]) >= 1


async def timed(request: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await request
    return response, time.monotonic() - started


async def test_a_chat_that_cannot_load_is_answered_at_once_and_comes_back(
    settings: Settings,
) -> None:
    s = web_settings(settings, store_timeout_s=1.0)
    bound = s.store_timeout_s + MARGIN_S
    async with running_server(s) as server, server.client() as c:
        chat_id = (await c.post("/chat", json={})).json()["id"]
        await trio.to_thread.run_sync(leave_response_open, s, chat_id)
        async with held(partial(log_locked, s)):
            for attempt in range(2):  # the second finds the first actor's successor
                with trio.fail_after(bound):
                    r, took = await timed(c.post("/generate", json={
                        "message": f"hello {attempt}", "chat_id": chat_id}))
                assert_store_unavailable(r)
                print(f"503 after {took:.2f} s (store timeout {s.store_timeout_s} s)")
            async with server.websocket() as ws:
                await send(ws, {"event": "user_message", "message": "over the socket",
                                "chat_id": chat_id, "client_message_id": "w-1"})
                frame = await receive(ws, bound)
                assert frame["event"] == "error" and frame["code"] == "store_unavailable", frame
        # the lock is gone: the chat comes back by itself
        with trio.fail_after(15):
            answer = await c.post("/generate", json={"message": "hello again",
                                                     "chat_id": chat_id})
        assert answer.status_code == 200 and answer.json()["message"]["status"] == "complete"
        page = (await c.get(f"/chat/{chat_id}")).json()
    assert [(m["role"], m.get("status"), m["content"] if m["role"] == "user" else None)
            for m in page["messages"]] == [
        ("user", None, "left open"), ("assistant", "interrupted", None),
        ("user", None, "hello again"), ("assistant", "complete", None),
    ]


@pg_only
async def test_every_request_is_answered_in_time_while_postgres_hangs(
    settings: Settings,
) -> None:
    s = web_settings(settings, store_timeout_s=1.0)
    bound = s.store_timeout_s + MARGIN_S
    async with running_server(s) as server, server.client() as alice:
        done = (await alice.post("/generate", json={"message": "before"})).json()
        chat_id = done["chat_id"]
        async with held(partial(everything_locked, s)), server.client(None) as anyone, \
                server.client("bob") as bob:  # bob's token was never checked: not cached
            with trio.fail_after(bound):
                health, took = await timed(anyone.get("/health"))
            print(f"/health answered {health.status_code} after {took:.2f} s")
            assert health.status_code == 503 and health.json()["status"] == "unavailable"
            assert took < min(3.0, s.store_timeout_s) + 0.5
            live = await anyone.get("/health/live")
            assert live.status_code == 200 and live.json() == {"status": "alive"}
            for request in (alice.get("/chats"), alice.get(f"/chat/{chat_id}"),
                            alice.get("/stats"), alice.get(f"/chat/{chat_id}/events"),
                            alice.post("/generate", json={"message": "new chat"}),
                            alice.post("/generate", json={"message": "m", "chat_id": chat_id}),
                            bob.get("/chats")):
                with trio.fail_after(bound):
                    r, took = await timed(request)
                assert_store_unavailable(r)
                print(f"{r.request.method} {r.request.url.path}: 503 after {took:.2f} s")
        took = await recovered(server, trio.current_time())
        print(f"ready again {took:.2f} s after the locks went")
        answer = await alice.post("/generate", json={"message": "after", "chat_id": chat_id})
        assert answer.json()["message"]["status"] == "complete"


KINDS = ("events", "views", "users")


def terminate(settings: Settings, for_s: float = 0.0) -> dict[str, int]:
    """Terminates this server's connections to the events, the views and the users (found
    by their ``application_name``, which names the test's own schema), and the new ones
    again every 20 ms for ``for_s`` seconds: a database that keeps dropping them. Returns
    how many of each kind were terminated."""
    assert settings.database_url
    names = {application_name(kind, settings.database_schema): kind for kind in KINDS}
    counts = dict.fromkeys(KINDS, 0)
    until = time.monotonic() + for_s
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = ANY(%s) AND pid <> pg_backend_pid()", (list(names),)
            ).fetchall()
            for name, terminated in rows:
                counts[names[name]] += bool(terminated)
            if time.monotonic() >= until:
                return counts
            time.sleep(0.02)


class Streams:
    """Replies streaming over WebSockets, each to its own message: what was acknowledged and
    how each reply ended."""

    def __init__(self, server: Server, count: int, tokens: int) -> None:
        self.server = server
        self.count = count
        self.tokens = tokens
        self.acked: dict[str, tuple[str, int]] = {}  # client_message_id -> (chat_id, seq)
        self.endings: dict[str, str] = {}  # client_message_id -> status (or error code)
        self.streaming = trio.Semaphore(0)

    async def run(self, nursery: trio.Nursery) -> None:
        for i in range(self.count):
            nursery.start_soon(self._one, f"m-{i}")
        for _ in range(self.count):
            await self.streaming.acquire()

    async def _one(self, cmid: str) -> None:
        async with self.server.websocket() as ws:
            await send(ws, {"event": "user_message", "message": f"/tokens {self.tokens}",
                            "client_message_id": cmid})
            told = False
            with trio.fail_after(30):
                while True:
                    frame = await receive(ws, 30)
                    if frame["event"] == "ack":
                        self.acked[cmid] = (frame["chat_id"], frame["seq"])
                    elif frame["event"] == "ai_response" and not frame["done"] and not told:
                        told = True
                        self.streaming.release()
                    elif frame["event"] == "ai_response" and frame["done"]:
                        self.endings[cmid] = frame["status"]
                        return
                    elif frame["event"] == "error" and "response_id" not in frame:
                        self.endings[cmid] = frame["code"]  # the message was refused
                        if not told:
                            self.streaming.release()
                        return


class HealthLog:
    """``/health`` polled every 20 ms: the statuses seen, and when it was ok again."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.seen: list[tuple[float, int, str]] = []

    async def poll(self) -> None:
        async with self.server.client(None) as c:
            while True:
                try:
                    r = await c.get("/health", timeout=10)
                    self.seen.append((trio.current_time(), r.status_code, r.json()["status"]))
                except httpx.TransportError:
                    self.seen.append((trio.current_time(), 0, "no answer"))
                await trio.sleep(0.02)

    def statuses(self) -> set[str]:
        return {status for _, _, status in self.seen}


async def recovered(server: Server, since: float) -> float:
    """Seconds from ``since`` until ``/health`` is ok and a new message gets its answer."""
    async with server.client("bob") as c:
        with trio.fail_after(30):
            while True:
                health = await c.get("/health")
                if health.status_code == 200 and health.json()["status"] == "ok":
                    answer = await c.post("/generate", json={"message": "are you back?"})
                    if answer.status_code == 200:
                        assert answer.json()["message"]["status"] == "complete"
                        return trio.current_time() - since
                await trio.sleep(0.05)


async def check_nothing_lost(server: Server, streams: Streams) -> None:
    """Every acknowledged message is in its chat once, every reply ended, and the views
    show the endings the clients saw."""
    assert set(streams.endings) == {f"m-{i}" for i in range(streams.count)}, streams.endings
    async with server.client() as c:
        for cmid, (chat_id, seq) in streams.acked.items():

            async def settled(chat_id: str = chat_id) -> Any:
                page = (await c.get(f"/chat/{chat_id}")).json()
                last = page["messages"][-1]
                return page if last["role"] == "assistant" and last["status"] != "streaming" \
                    else None

            page = await eventually(settled, limit_s=10)
            users = [m for m in page["messages"] if m["role"] == "user"]
            assert [(m["seq"], m["client_message_id"]) for m in users] == [(seq, cmid)]
            assert page["messages"][-1]["status"] == streams.endings[cmid]
            assert streams.endings[cmid] in ("complete", "interrupted")


@pg_only
async def test_terminated_connections_heal_by_themselves(settings: Settings) -> None:
    s = web_settings(settings, store_timeout_s=2.0, concurrent_responses=10)
    async with running_server(s) as server:
        streams, health = Streams(server, 4, 3000), HealthLog(server)
        async with trio.open_nursery() as nursery:
            await streams.run(nursery)
            nursery.start_soon(health.poll)
            # 2 s of terminations, so that some fall on connections in use (a pool replaces
            # an idle one unseen)
            killed = await trio.to_thread.run_sync(terminate, s, 2.0)
            assert killed["events"] >= 1 and killed["views"] >= 1, killed
            took = await recovered(server, trio.current_time())
            print(f"terminated {killed} in 1 s; ready again {took:.2f} s later;"
                  f" /health said {sorted(health.statuses())}")
            assert took < 5.0
            with trio.fail_after(20):
                while len(streams.endings) < streams.count:  # noqa: ASYNC110 - other tasks
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        print(f"the replies ended: {streams.endings}")
        assert health.statuses() & {"degraded", "unavailable"}, health.seen
        await check_nothing_lost(server, streams)


@pg_only
async def test_terminated_connections_heal_on_two_servers_sharing_the_database(
    settings: Settings,
) -> None:
    """Both servers' pool connections (events, views, users) are terminated while replies
    stream on each: both are ready again within 5 s, every reply ends, nothing acknowledged
    is lost, and each server's views show what the other wrote."""
    s = web_settings(settings, store_timeout_s=2.0, concurrent_responses=10)
    async with running_server(s) as first, running_server(s) as second:
        streams = [Streams(first, 2, 2000), Streams(second, 2, 2000)]
        health = [HealthLog(first), HealthLog(second)]
        async with trio.open_nursery() as nursery:
            for stream, log in zip(streams, health, strict=True):
                await stream.run(nursery)
                nursery.start_soon(log.poll)
            killed = await trio.to_thread.run_sync(terminate, s, 2.0)
            assert killed["events"] >= 2 and killed["views"] >= 2, killed
            since = trio.current_time()
            took = [await recovered(server, since) for server in (first, second)]
            print(f"terminated {killed} in 1 s; ready again {took} s later")
            assert max(took) < 5.0
            with trio.fail_after(20):
                while any(len(x.endings) < x.count for x in streams):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        for log in health:
            assert log.statuses() & {"degraded", "unavailable"}, log.seen
        for stream in streams:
            await check_nothing_lost(first, stream)
            await check_nothing_lost(second, stream)
