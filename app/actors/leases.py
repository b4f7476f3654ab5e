"""Which process runs each chat: ``Leases`` (see ``cluster``'s docstring for the design).

``PostgresLeases`` holds a session-level advisory lock per chat on one dedicated connection
and bumps the chat's epoch in the leases' table with each take: the epoch is the ``Fence``
every save of the chat carries. ``LocalLeases`` (SQLite, one process per data directory)
grants every chat at once, with no fence.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, TypeVarTuple
from uuid import UUID

import psycopg
import trio
from psycopg import sql

from ..config import Settings
from ..events.application import LEASES_TABLE, Fence
from ..events.errors import StoreUnavailableError
from ..storage.postgres import connect
from .connections import BACKOFF_MAX_S, BACKOFF_START_S, LEASES, Connection, reason

log = logging.getLogger(__name__)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def lock_key(chat_id: UUID) -> int:
    """A chat's advisory-lock key: its first 8 bytes as a signed 64-bit integer."""
    return int.from_bytes(chat_id.bytes[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class Lease:
    """This process runs ``chat_id``. ``fence`` is what its saves must carry (None: no other
    process can write, SQLite); ``taken_over``: the chat was last leased by another server
    (not this one before a restart)."""

    chat_id: UUID
    fence: Fence | None = None
    taken_over: bool = False


class LocalLeases:
    """One process owns every chat (SQLite: the data directory is locked): no fencing."""

    problem: str | None = None

    async def acquire(self, chat_id: UUID) -> Lease | None:
        return Lease(chat_id)

    async def release(self, chat_id: UUID) -> None:
        pass

    def close(self) -> None:
        pass


class PostgresLeases:
    """Advisory locks and epochs on one connection; calls are serialised and run in a worker
    thread. Any error on the connection loses every lease held on it: ``on_lost(chat_ids)``
    runs on the trio thread before any other lease call, and the connection is made again by
    the next call (``watch()`` makes one every ``lease_check_interval_s``, with backoff)."""

    def __init__(
        self, settings: Settings, on_lost: Callable[[list[UUID]], None] = lambda chats: None
    ) -> None:
        assert settings.database_url
        self._settings = settings
        self._interval = settings.lease_check_interval_s
        self._on_lost = on_lost
        #: This server, as its restarts see it: host name and configured port.
        self.server = f"{socket.gethostname()}:{settings.port}"
        #: Who holds a lease, as the leases' table shows it: the server, pid and run tag.
        self.holder = f"{self.server}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        table = sql.SQL("{}.{}").format(
            sql.Identifier(settings.database_schema or "public"), sql.Identifier(LEASES_TABLE)
        )
        # The sub-select sees the row as it was before the statement: the last holder.
        self._take_epoch = sql.SQL(
            "INSERT INTO {t} AS l (chat_id, holder, epoch) VALUES (%(c)s, %(h)s, 1) "
            "ON CONFLICT (chat_id) DO UPDATE SET holder = EXCLUDED.holder, epoch = l.epoch + 1 "
            "RETURNING l.epoch, (SELECT holder FROM {t} WHERE chat_id = %(c)s) AS previous"
        ).format(t=table)
        self._conn: Connection | None = None
        self._lock = trio.Lock()
        self._held: dict[UUID, Lease] = {}
        #: Why leases cannot be taken now (the connection is lost), or None.
        self.problem: str | None = None

    async def acquire(self, chat_id: UUID) -> Lease | None:
        """Takes the chat's lease if no process holds it, bumping its epoch; None if another
        process holds it or the database cannot be reached now."""
        try:
            with trio.CancelScope(shield=True):  # a lock taken is never left unrecorded
                taken = await self._call(self._take, chat_id)
        except StoreUnavailableError:
            return None
        if taken is None:
            return None
        epoch, previous = taken
        # a chat last leased by this server (host and port) is taken after its own restart
        others = previous is not None and previous.rsplit(":", 2)[0] != self.server
        lease = Lease(chat_id, Fence(chat_id, epoch), others)
        self._held[chat_id] = lease
        return lease

    def _take(self, conn: Connection, chat_id: UUID) -> tuple[int, str] | None:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(chat_id),)).fetchone()
        if not (row and row[0]):
            return None
        # waits for a save of the previous holder that is past its fence check to commit
        taken = conn.execute(self._take_epoch, {"c": chat_id, "h": self.holder}).fetchone()
        assert taken is not None
        return int(taken[0]), taken[1]

    async def release(self, chat_id: UUID) -> None:
        if self._held.pop(chat_id, None) is not None:
            with trio.CancelScope(shield=True):
                await self._call(_unlock, chat_id)

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Checks the connection every ``lease_check_interval_s`` until cancelled; after a
        failure, tries again with backoff (each try makes the connection again)."""
        task_status.started()
        backoff = BACKOFF_START_S
        while True:
            try:
                await self._call(_ping)
            except StoreUnavailableError:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_START_S
            await trio.sleep(self._interval)

    async def _call(self, fn: Callable[[Connection, *Ts], T], *args: *Ts) -> T:
        async with self._lock:
            try:
                result = await trio.to_thread.run_sync(self._in_thread, fn, *args)
            except psycopg.Error as exc:
                self._lose(reason(exc))
                raise StoreUnavailableError("could not reach PostgreSQL for chat leases") from exc
            self.problem = None
            return result

    def _in_thread(self, fn: Callable[[Connection, *Ts], T], *args: *Ts) -> T:
        if self._conn is None:
            self._conn = connect(self._settings, LEASES, statement_timeout=False)
        try:
            return fn(self._conn, *args)
        except psycopg.Error:
            # whatever went wrong, the locks go with the connection: none is kept by halves
            conn, self._conn = self._conn, None
            conn.close()
            raise

    def _lose(self, why: str) -> None:
        self.problem = f"chat leases: connection lost ({why}); reconnecting"
        lost, self._held = list(self._held), {}
        if lost:
            log.warning("lease connection lost (%s): %d chats stop being written here",
                        why, len(lost))
            self._on_lost(lost)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _ping(conn: Connection) -> None:
    conn.execute("SELECT 1")


def _unlock(conn: Connection, chat_id: UUID) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(chat_id),))
