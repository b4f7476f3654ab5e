"""Several server processes on one PostgreSQL: chat ownership and live fan-out.

``Leases`` decides which process runs a chat's actor: a session-level advisory lock per chat,
held on one dedicated connection per process. A process that dies loses its connection and so
its locks, and the chats it owned can be taken over. On SQLite there is one process per data
directory, which owns every chat (``LocalLeases``).

``Bus`` carries what one process must tell the others, batched into ``NOTIFY`` payloads on a
channel named after the schema: streamed deltas (``d``), the seq range of events a process
saved (``e``), ends of responses (``z``) and stop requests (``x``). A dedicated connection
``LISTEN``s in a worker thread and hands each item to the trio side. Delivery follows
PostgreSQL's: at most once, in order per sender; the event log stays the source of truth.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any
from uuid import UUID

import psycopg
import trio
from psycopg import sql

from ..config import Settings
from ..events.errors import StoreUnavailableError

log = logging.getLogger(__name__)

#: NOTIFY payloads must stay under 8000 bytes.
MAX_PAYLOAD = 7500
FLUSH_INTERVAL_S = 0.005


#: Longer deltas are sent in pieces of this many characters (a payload holds several).
MAX_DELTA_CHARS = 1000


def _encoded(items: list[dict[str, Any]]) -> list[str]:
    """Items as JSON lines, long deltas cut into pieces that fit in a payload."""
    lines: list[str] = []
    for item in items:
        if item["k"] == "d" and len(item["t"]) > MAX_DELTA_CHARS:
            text, offset = item["t"], item["o"]
            for start in range(0, len(text), MAX_DELTA_CHARS):
                piece = {**item, "t": text[start : start + MAX_DELTA_CHARS], "o": offset + start}
                lines.append(json.dumps(piece, separators=(",", ":")))
        else:
            lines.append(json.dumps(item, separators=(",", ":")))
    return lines


def lock_key(chat_id: UUID) -> int:
    """A chat's advisory-lock key: its first 8 bytes as a signed 64-bit integer."""
    return int.from_bytes(chat_id.bytes[:8], "big", signed=True)


class LocalLeases:
    """One process owns every chat (SQLite: the data directory is locked)."""

    async def acquire(self, chat_id: UUID) -> bool:
        return True

    async def release(self, chat_id: UUID) -> None:
        pass

    def close(self) -> None:
        pass


class PostgresLeases:
    """Advisory locks on one connection; calls are serialised and run in a worker thread."""

    def __init__(self, settings: Settings) -> None:
        assert settings.database_url
        self._url = settings.database_url
        self._conn: psycopg.Connection[Any] | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def acquire(self, chat_id: UUID) -> bool:
        row = await self._run("SELECT pg_try_advisory_lock(%s)", lock_key(chat_id))
        return bool(row and row[0])

    async def release(self, chat_id: UUID) -> None:
        await self._run("SELECT pg_advisory_unlock(%s)", lock_key(chat_id))

    async def _run(self, query: str, key: int) -> Any:
        def call() -> Any:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
                return self._conn.execute(query, (key,)).fetchone()
            except psycopg.Error as exc:
                raise StoreUnavailableError("could not reach PostgreSQL for chat leases") from exc

        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class Bus:
    """Batched NOTIFY out, LISTEN in; ``deliver(item)`` runs on the trio thread."""

    def __init__(self, settings: Settings, deliver: Callable[[dict[str, Any]], None]) -> None:
        assert settings.database_url
        self._url = settings.database_url
        self.channel = f"eventchat_{settings.database_schema}"[:63]
        self.sender = uuid.uuid4().hex[:12]
        self._deliver = deliver
        self._outbox: list[dict[str, Any]] = []
        self._waiting = trio.Event()
        self._stopping = False

    def send(self, **item: Any) -> None:
        """Queues an item for the next NOTIFY (within ``FLUSH_INTERVAL_S``). A delta that
        continues the last queued one is merged into it: one item per burst, not per token."""
        last = self._outbox[-1] if self._outbox else None
        if (
            item["k"] == "d"
            and last is not None
            and last["k"] == "d"
            and last["r"] == item["r"]
            and last["o"] + len(last["t"]) == item["o"]
        ):
            last["t"] += item["t"]
            return
        self._outbox.append(item)
        self._waiting.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listens and sends until cancelled."""
        token = trio.lowlevel.current_trio_token()
        listening = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, token, listening)
            await listening.wait()
            task_status.started()
            try:
                await self._send_loop()
            finally:
                self._stopping = True

    async def _listen(self, token: trio.lowlevel.TrioToken, listening: trio.Event) -> None:
        def listen() -> None:
            with psycopg.connect(self._url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                trio.from_thread.run_sync(listening.set, trio_token=token)
                own = f"{self.sender}|"
                while not self._stopping:
                    for note in conn.notifies(timeout=0.25):
                        if not note.payload.startswith(own):  # PostgreSQL echoes our own
                            trio.from_thread.run_sync(
                                self._receive, note.payload, trio_token=token
                            )

        try:
            await trio.to_thread.run_sync(listen, abandon_on_cancel=True)
        finally:
            self._stopping = True

    def _receive(self, payload: str) -> None:
        _, _, body = payload.partition("|")
        for line in body.split("\n"):
            try:
                self._deliver(json.loads(line))
            except Exception:  # noqa: BLE001 - one bad item must not stop the bus
                log.exception("could not handle a bus item")

    async def _send_loop(self) -> None:
        limiter = trio.CapacityLimiter(1)
        conn: psycopg.Connection[Any] | None = None

        def send(payloads: list[str]) -> None:
            nonlocal conn
            if conn is None or conn.closed:
                conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
            for payload in payloads:
                conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

        try:
            while True:
                await self._waiting.wait()
                await trio.sleep(FLUSH_INTERVAL_S)
                items, self._outbox, self._waiting = self._outbox, [], trio.Event()
                try:
                    await trio.to_thread.run_sync(
                        send, self._payloads(_encoded(items)), limiter=limiter
                    )
                except psycopg.Error as exc:
                    log.warning(
                        "bus: %d live items not sent to other processes: %s", len(items), exc
                    )
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    def _payloads(self, items: list[str]) -> list[str]:
        payloads: list[str] = []
        batch: list[str] = []
        size = 0
        for item in items:
            if batch and size + len(item) + 1 > MAX_PAYLOAD:
                payloads.append(f"{self.sender}|" + "\n".join(batch))
                batch, size = [], 0
            batch.append(item)
            size += len(item) + 1
        if batch:
            payloads.append(f"{self.sender}|" + "\n".join(batch))
        return payloads
