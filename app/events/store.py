"""The trio face of the event store: every blocking call in a worker thread.

``EventStore`` wraps a ``ChatApplication``; each method runs the library call in
``trio.to_thread.run_sync`` through one ``CapacityLimiter`` sized to the database pool, and
maps the library's errors to ours once, here. On cancellation the worker thread finishes its
call (a save is never half-done) and the cancellation propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import trio
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import (
    IntegrityError,
    Notification,
    PersistenceError,
    Recording,
)
from psycopg import sql

from ..config import Settings
from .application import ChatApplication, Fence, persistence_env
from .domain import ChatSession
from .errors import ChatNotFoundError, ConcurrencyError, StoreUnavailableError

T = TypeVar("T")


@contextmanager
def mapped_store_errors() -> Iterator[None]:
    try:
        yield
    except AggregateNotFoundError as exc:
        raise ChatNotFoundError("chat not found") from exc
    except IntegrityError as exc:
        raise ConcurrencyError("the chat was changed by another writer") from exc
    except PersistenceError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreUnavailableError(f"event store unavailable: {reason}") from exc


def ensure_schema(url: str, schema: str) -> None:
    """Creates the PostgreSQL schema for every table if it does not exist yet (blocking)."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreUnavailableError(f"PostgreSQL unavailable: {reason}") from exc


class EventStore:
    """Async access to the chat event log.

    ``on_saved`` callbacks run on the trio thread after every successful save with the
    highest notification id written (the projection runner uses it as a nudge).
    """

    def __init__(self, app: ChatApplication, limiter: trio.CapacityLimiter) -> None:
        self.app = app
        self.limiter = limiter
        self.on_saved: list[Callable[[int], None]] = []
        #: The highest notification id this process has saved.
        self.last_saved = 0

    @classmethod
    def open(cls, settings: Settings) -> EventStore:
        """Builds the application for ``settings`` (blocking: creates tables if needed)."""
        if settings.database_url:
            ensure_schema(settings.database_url, settings.database_schema)
        with mapped_store_errors():
            app = ChatApplication(
                env=persistence_env(settings), snapshot_interval=settings.snapshot_interval
            )
        return cls(app, trio.CapacityLimiter(settings.store_threads))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a blocking store call in a worker thread, with errors mapped."""

        def call() -> T:
            with mapped_store_errors():
                return fn(*args)

        return await trio.to_thread.run_sync(call, limiter=self.limiter)

    async def get(self, chat_id: UUID) -> ChatSession:
        return await self.run(self.app.get_chat, chat_id)

    async def save(self, *objs: Any, fence: Fence | None = None) -> list[Recording[UUID]]:
        """Saves the pending events of ``objs`` atomically; raises ``ConcurrencyError``, or
        ``FencedError`` if ``fence`` (PostgreSQL) no longer matches the chat's lease."""
        if fence is None:
            recordings = await self.run(self.app.save, *objs)
        else:
            recordings = await self.run(lambda: self.app.save(*objs, fence=fence))
        if recordings:
            position = max(r.notification.id for r in recordings)
            self.last_saved = max(self.last_saved, position)
            for callback in list(self.on_saved):
                callback(position)
        return recordings

    async def select(self, start: int, limit: int) -> list[Notification]:
        return await self.run(self.app.select, start, limit)

    async def max_position(self) -> int:
        return await self.run(self.app.max_position)

    def close(self) -> None:
        self.app.close()
