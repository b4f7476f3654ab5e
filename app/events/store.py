"""The trio face of the event store: every blocking call in a worker thread.

``EventStore`` wraps a ``ChatApplication``; each method runs the library call in
``trio.to_thread.run_sync`` through one ``CapacityLimiter`` sized to the database pool, and
maps the library's errors to ours once, here.

Reads (``read``, ``get``, ``select``, ``max_position``) answer within ``timeout_s``: a store
that does not answer by then raises ``StoreUnavailableError``, and the worker thread is
abandoned (it ends by itself, within the driver's bounds: see ``app.storage.postgres``);
cancellation abandons it the same way. Writes (``run``, ``save``) are never abandoned: on
cancellation the worker thread finishes its call (a save is never half-done, and its caller
learns whether it committed) and the cancellation propagates; the driver's bounds (connect,
pool and lock timeouts, keepalives, ``statement_timeout``) keep them from waiting forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import ParamSpec, TypeVar
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

from ..config import Settings
from ..storage.postgres import schema_lock
from ..storage.recorder import Fence, deadline, persistence_env
from .application import ChatApplication
from .audit import link_unlinked
from .domain import ChatSession
from .errors import ChatNotFoundError, ConcurrencyError, StoreUnavailableError

T = TypeVar("T")
P = ParamSpec("P")


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


@contextmanager
def postgres_errors() -> Iterator[None]:
    """Maps the driver's errors (schema creation) to ``StoreUnavailableError``."""
    try:
        yield
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreUnavailableError(f"PostgreSQL unavailable: {reason}") from exc


class EventStore:
    """Async access to the chat event log.

    ``on_saved`` callbacks run on the trio thread after every successful save with the
    highest notification id written (the views updater uses it as a nudge).
    """

    def __init__(
        self, app: ChatApplication, limiter: trio.CapacityLimiter, timeout_s: float = 5.0
    ) -> None:
        self.app = app
        self.limiter = limiter
        #: Longest a read waits for the store before ``StoreUnavailableError``.
        self.timeout_s = timeout_s
        self.on_saved: list[Callable[[int], None]] = []
        #: The highest notification id this process has saved.
        self.last_saved = 0
        #: When (trio clock) and why the store last could not be used.
        self._failure: tuple[float, str] | None = None

    @classmethod
    def open(cls, settings: Settings) -> EventStore:
        """Builds the application for ``settings`` (blocking: creates tables if needed and
        links the audit chain of chats stored before it had one; on PostgreSQL one process
        at a time, so that concurrent starts do not collide)."""

        def build() -> ChatApplication:
            with mapped_store_errors():
                app = ChatApplication(
                    env=persistence_env(settings), snapshot_interval=settings.snapshot_interval
                )
                try:
                    link_unlinked(app, unless_done=True)  # a store older than the chain
                except BaseException:
                    app.close()
                    raise
                return app

        if settings.database_url:
            with postgres_errors(), schema_lock(settings):
                app = build()
        else:
            app = build()
        return cls(app, trio.CapacityLimiter(settings.store_threads), settings.store_timeout_s)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs a blocking store call in a worker thread, with errors mapped (never
        abandoned: use it for writes)."""

        def call() -> T:
            with mapped_store_errors(), deadline(self.timeout_s):
                return fn(*args, **kwargs)

        with self._noting_failures():
            return await trio.to_thread.run_sync(call, limiter=self.limiter)

    async def read(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs a blocking call that only reads, bounded by ``timeout_s``: a store that does
        not answer by then raises ``StoreUnavailableError`` and the thread is abandoned."""

        def call() -> T:
            with mapped_store_errors(), deadline(self.timeout_s):
                return fn(*args, **kwargs)

        with self._noting_failures():
            with trio.move_on_after(self.timeout_s):
                return await trio.to_thread.run_sync(
                    call, limiter=self.limiter, abandon_on_cancel=True
                )
            raise StoreUnavailableError(
                f"event store unavailable: no answer within {self.timeout_s:g} s"
            )

    @contextmanager
    def _noting_failures(self) -> Iterator[None]:
        try:
            yield
        except StoreUnavailableError as exc:
            self._failure = (trio.current_time(), str(exc).splitlines()[0] if str(exc) else "")
            raise

    def recent_failure(self, within_s: float) -> str | None:
        """Why the store could not be used, if that happened in the last ``within_s``
        seconds (a readiness check reports it: requests were refused meanwhile)."""
        if self._failure is None:
            return None
        at, reason = self._failure
        ago = trio.current_time() - at
        return f"the event store failed {ago:.1f} s ago: {reason}" if ago < within_s else None

    async def get(self, chat_id: UUID) -> ChatSession:
        return await self.read(self.app.get_chat, chat_id)

    async def save(self, *chats: ChatSession, fence: Fence | None = None
                   ) -> list[Recording[UUID]]:
        """Saves the pending events of ``chats`` atomically; raises ``ConcurrencyError``, or
        ``FencedError`` if ``fence`` (PostgreSQL) no longer matches the chat's lease."""
        if fence is None:
            recordings = await self.run(self.app.save, *chats)
        else:
            recordings = await self.run(partial(self.app.save, *chats, fence=fence))
        if recordings:
            position = max(r.notification.id for r in recordings)
            self.last_saved = max(self.last_saved, position)
            for callback in list(self.on_saved):
                callback(position)
        return recordings

    async def destroy_key(self, chat_id: UUID) -> None:
        """Destroys the chat's data key (crypto-shredding: its events become unreadable)."""
        await self.run(self.app.destroy_key, chat_id)

    async def select(self, start: int, limit: int) -> list[Notification]:
        return await self.read(self.app.select, start, limit)

    async def max_position(self) -> int:
        return await self.read(self.app.max_position)

    def close(self) -> None:
        self.app.close()
