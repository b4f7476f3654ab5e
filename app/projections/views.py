"""The read side: chat lists, message pages, search and stats, all read from the views.

``Views`` is shared by the web layer (reads) and the ``ViewUpdater`` (writes through
``apply``). Its async methods run the blocking database work in worker threads through one
``CapacityLimiter``, and only read: a database that does not answer within ``timeout_s``
raises ``ViewStoreError``, and the worker thread is abandoned (as it is on cancellation; it
ends by itself within the driver's bounds). Database failures raise ``ViewStoreError``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, ParamSpec, TypedDict, TypeVar
from uuid import UUID

import trio
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, Notification

from ..config import Settings
from ..events.text import clean_text, text_problem
from ..storage.database import Database, open_database
from ..storage.errors import ViewDataError, ViewStoreError
from ..storage.sql import Tx
from ..storage.tables import TRACKED
from . import projector, stats
from .batch import Batch, chat_scope, user_scope
from .rows import ChatDict, ChatRow, MessageDict, MessageRow, chat_dict, message_dict
from .search import Snippet, search_rows

T = TypeVar("T")
P = ParamSpec("P")
log = logging.getLogger(__name__)
#: Domain events, as the updater projects them.
Events = list[DomainEventProtocol[UUID]]


class SearchHit(TypedDict):
    chat: ChatDict
    snippets: list[Snippet]


class SkippedEvent(TypedDict):
    """An event the views passed over, and why."""

    position: int
    chat_id: str
    topic: str
    error: str
    skipped_at: str


class Views:
    """Async reads of the views, and the blocking ``apply`` the updater writes with."""

    def __init__(self, db: Database, limiter: trio.CapacityLimiter,
                 timeout_s: float = 5.0) -> None:
        self.db = db
        self.limiter = limiter
        #: Longest a read waits for the database before ``ViewStoreError``.
        self.timeout_s = timeout_s
        self._known = 0
        #: Events this process passed over (``apply``): counted for ``/metrics``.
        self.skipped = 0
        self._advanced: trio.Event | None = None
        #: Set while a reader waits for the views (``wait_for``): the updater stops
        #: gathering saves and catches up at once.
        self.wanted = trio.Event()

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs a blocking read, bounded by ``timeout_s`` (its thread abandoned after it)."""
        with trio.move_on_after(self.timeout_s):
            return await trio.to_thread.run_sync(partial(fn, *args, **kwargs),
                                                 limiter=self.limiter, abandon_on_cancel=True)
        raise ViewStoreError(f"views database unavailable: no answer within {self.timeout_s:g} s")

    # -- writing (blocking, called by the updater in a worker thread) ---------------------

    def apply(
        self,
        notifications: Sequence[Notification],
        mapper: Mapper[UUID],
        on_applied: Callable[[Events], None] | None = None,
    ) -> int:
        """Projects ``notifications`` and records their position, in one transaction.

        Notifications at or below the tracked position are skipped, so delivering an event
        twice changes nothing. ``on_applied`` gets the events this call projected, once
        committed (so with several processes each event reaches one of them). Returns the
        tracked position afterwards.

        An event that cannot be projected (it cannot be decoded, a handler fails on it, or
        the database refuses its values) never stops the views: the batch is retried one
        event at a time, and that event alone is recorded in ``view_skipped`` (with the
        error) and passed over, in the same transaction as the position. A database that
        cannot be reached raises ``ViewStoreError``, and nothing is skipped.
        """
        try:
            return self._apply(notifications, mapper, on_applied)
        except Exception as exc:
            if not _unprojectable(exc):
                raise
            if len(notifications) == 1:
                return self._skip(notifications[0], exc)
        position = 0
        for notification in notifications:
            try:
                position = self._apply([notification], mapper, on_applied)
            except Exception as exc:
                if not _unprojectable(exc):
                    raise
                position = self._skip(notification, exc)
        return position

    def _apply(
        self,
        notifications: Sequence[Notification],
        mapper: Mapper[UUID],
        on_applied: Callable[[Events], None] | None,
    ) -> int:
        with self.db.write() as tx:
            position = _tracked(tx)
            fresh = [mapper.to_domain_event(n) for n in notifications if n.id > position]
            if not fresh:
                return position
            batch = Batch(tx)
            for event in fresh:
                projector.apply(batch.rows, event)
            batch.flush()
            position = notifications[-1].id
            tx.run("UPDATE view_tracking SET position = ? WHERE name = ?", (position, TRACKED))
        if on_applied is not None:
            on_applied(fresh)
        return position

    def _skip(self, notification: Notification, exc: Exception) -> int:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        log.error("views: event %d (%s of chat %s) cannot be projected and is skipped: %s",
                  notification.id, notification.topic, notification.originator_id, error)
        with self.db.write() as tx:
            position = _tracked(tx)
            if notification.id <= position:
                return position
            tx.run("INSERT INTO view_skipped (position, chat_id, topic, error, skipped_at)"
                   " VALUES (?, ?, ?, ?, ?) ON CONFLICT (position) DO NOTHING",
                   (notification.id, str(notification.originator_id),
                    clean_text(notification.topic), clean_text(error), _now()))
            tx.run("UPDATE view_tracking SET position = ? WHERE name = ?",
                   (notification.id, TRACKED))
        self.skipped += 1
        return notification.id

    def read_skipped(self, limit: int = 100) -> tuple[int, list[SkippedEvent]]:
        """Blocking: how many events the views passed over, and the latest ``limit``."""
        with self.db.read() as tx:
            total = int(tx.value("SELECT COUNT(*) FROM view_skipped"))
            rows = tx.all("SELECT position, chat_id, topic, error, skipped_at FROM view_skipped"
                          " ORDER BY position DESC LIMIT ?", (limit,))
        return total, [SkippedEvent(position=position, chat_id=chat_id, topic=topic, error=error,
                                    skipped_at=skipped_at)
                       for position, chat_id, topic, error, skipped_at in rows]

    async def skipped_events(self, limit: int = 100) -> tuple[int, list[SkippedEvent]]:
        return await self._run(self.read_skipped, limit)

    def reset(self) -> None:
        """Drops every view and its position (blocking); the next run rebuilds from zero."""
        self.db.drop()
        self._known = 0

    def advanced(self, position: int) -> None:
        """Told by the updater of this process that the views reached ``position``."""
        self._known = max(self._known, position)
        if self._advanced is not None:
            self._advanced.set()
            self._advanced = None

    # -- reading ------------------------------------------------------------------------

    def read_position(self) -> int:
        with self.db.read() as tx:
            return _tracked(tx)

    async def position(self) -> int:
        """The notification id up to which the views are built."""
        return await self._run(self.read_position)

    # The web layer's read-your-writes call wants a bounded wait that answers False, not an
    # exception, hence a timeout argument rather than the caller's cancel scope.
    async def wait_for(self, position: int, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
        """Waits until the views include notification ``position``; False after ``timeout``.

        Woken by this process's updater, and polls the database (every 50 ms) for an updater
        in another process.
        """
        with trio.move_on_after(timeout):
            while self._known < position:
                self._known = max(self._known, await self.position())
                if self._known >= position:
                    break
                self.wanted.set()
                if self._advanced is None:
                    self._advanced = trio.Event()
                with trio.move_on_after(0.05):
                    await self._advanced.wait()
            return True
        return False

    async def list_chats(
        self, owner: str, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[ChatDict], str | None]:
        """``owner``'s chats, most recent activity first, and the cursor of the next page.

        A malformed cursor reads as the first page.
        """
        return await self._run(self._list_chats, owner, max(1, min(limit, 500)), cursor)

    def _list_chats(
        self, owner: str, limit: int, cursor: str | None
    ) -> tuple[list[ChatDict], str | None]:
        after = _decode_cursor(cursor)
        where, params = "owner = ?", [owner]
        if after is not None:
            where += " AND (updated_at, chat_id) < (?, ?)"
            params += after
        with self.db.read() as tx:
            rows = [ChatRow.from_row(row) for row in tx.all(
                f"{ChatRow.SELECT} WHERE {where} ORDER BY updated_at DESC, chat_id DESC LIMIT ?",
                (*params, limit + 1))]
        chats = [chat_dict(row) for row in rows[:limit]]
        more = len(rows) > limit
        return chats, _encode_cursor(rows[limit - 1]) if more else None

    async def get_chat(self, owner: str, chat_id: UUID | str) -> ChatDict | None:
        """The chat, or None when it does not exist or is not ``owner``'s."""
        return await self._run(self._get_chat, owner, str(chat_id))

    def _get_chat(self, owner: str, chat_id: str) -> ChatDict | None:
        with self.db.read() as tx:
            row = _chat_row(tx, owner, chat_id)
        return None if row is None else chat_dict(row)

    async def messages(
        self,
        owner: str,
        chat_id: UUID | str,
        limit: int = 100,
        before_seq: int | None = None,
        after_seq: int | None = None,
    ) -> tuple[list[MessageDict], bool]:
        """A page of the chat's messages, oldest first, and whether more exist beyond it.

        With ``after_seq`` the page starts just after it (``has_more``: newer ones remain);
        otherwise it ends just before ``before_seq`` or at the latest message (``has_more``:
        older ones remain). A chat that is not ``owner``'s has no messages.
        """
        limit = max(1, min(limit, 1000))
        return await self._run(self._messages, owner, str(chat_id), limit, before_seq, after_seq)

    def _messages(
        self, owner: str, chat_id: str, limit: int, before: int | None, after: int | None
    ) -> tuple[list[MessageDict], bool]:
        select = f"{MessageRow.SELECT} WHERE chat_id = ?"
        with self.db.read() as tx:
            if tx.one("SELECT 1 FROM view_chats WHERE chat_id = ? AND owner = ?",
                      (chat_id, owner)) is None:
                return [], False
            if after is not None:
                rows = tx.all(f"{select} AND seq > ? ORDER BY seq LIMIT ?",
                              (chat_id, after, limit + 1))
            else:
                bound = before if before is not None else 2**31 - 1
                rows = tx.all(f"{select} AND seq < ? ORDER BY seq DESC LIMIT ?",
                              (chat_id, bound, limit + 1))
                rows.reverse()
        more = len(rows) > limit
        if more:
            rows = rows[:limit] if after is not None else rows[1:]
        return [message_dict(MessageRow.from_row(row)) for row in rows], more

    async def search(self, owner: str, q: str, limit: int = 20) -> list[SearchHit]:
        """``owner``'s chats matching ``q`` (words, quoted phrases, ``-word``), best first,
        each with up to three matching message snippets. Never another user's chats."""
        return await self._run(self._search, owner, q, max(1, min(limit, 100)))

    def _search(self, owner: str, q: str, limit: int) -> list[SearchHit]:
        with self.db.read() as tx:
            hits = search_rows(tx, owner, q, limit)
            results: list[SearchHit] = []
            for chat_id, snippets in hits:
                row = _chat_row(tx, owner, chat_id)
                if row is not None:
                    results.append({"chat": chat_dict(row), "snippets": snippets})
        return results

    async def stats(
        self, owner: str | None = None, chat_id: UUID | str | None = None
    ) -> dict[str, Any]:
        """Stats (the contract's shape, without ``live``): overall, ``owner``'s, or one of
        ``owner``'s chats. A chat that is not ``owner``'s reads as empty stats."""
        return await self._run(self._stats, owner, None if chat_id is None else str(chat_id))

    def _stats(self, owner: str | None, chat_id: str | None) -> dict[str, Any]:
        with self.db.read() as tx:
            if chat_id is not None:
                if owner is not None and _chat_row(tx, owner, chat_id) is None:
                    return stats.empty()
                return stats.read(tx, chat_scope(chat_id))
            if owner is not None:
                return stats.read(tx, user_scope(owner))
            return stats.read(tx, "all")

    def close(self) -> None:
        self.db.close()


def open_views(settings: Settings) -> Views:
    """Opens the views for ``settings``' store, creating their tables if needed (blocking)."""
    return Views(open_database(settings), trio.CapacityLimiter(max(2, settings.store_threads)),
                 settings.store_timeout_s)


def _tracked(tx: Tx) -> int:
    row = tx.one("SELECT position FROM view_tracking WHERE name = ?", (TRACKED,))
    return int(row[0]) if row else 0


def _chat_row(tx: Tx, owner: str, chat_id: str) -> ChatRow | None:
    row = tx.one(f"{ChatRow.SELECT} WHERE chat_id = ? AND owner = ?", (chat_id, owner))
    return None if row is None else ChatRow.from_row(row)


def _encode_cursor(row: ChatRow) -> str:
    raw = json.dumps([row.updated_at, row.chat_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> list[str] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, str) and text_problem(v) is None for v in value)):
        return value
    return None


def _unprojectable(exc: Exception) -> bool:
    """True for a fault of the events themselves, which retrying would not cure: the
    database refused a value, or decoding or a handler failed. A database that cannot be
    reached (any other ``ViewStoreError``) is worth retrying."""
    return isinstance(exc, ViewDataError) or not isinstance(exc, ViewStoreError)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
