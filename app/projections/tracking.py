"""The views' writes, each with the tracked position in the same transaction (exactly once).

``apply`` projects notifications and records their position in one transaction; an event
that cannot be projected is recorded in ``view_skipped`` and passed over instead, so one bad
event never stops the views. The events of a deleted chat, which nothing can read any more
(its key is destroyed), are passed over without a word, and its ``Deleted`` event removes it
from the views (``deletion``). Every function here is blocking (a worker thread's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypedDict
from uuid import UUID

from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, Notification

from ..events.domain import ChatSession
from ..events.errors import ChatDeletedError
from ..events.text import clean_text
from ..storage.database import Database
from ..storage.errors import ViewDataError, ViewStoreError
from ..storage.sql import Tx
from ..storage.tables import TRACKED
from . import projector
from .batch import Batch
from .deletion import forget_chat

log = logging.getLogger(__name__)
#: Domain events, as the views project them.
Events = list[DomainEventProtocol[UUID]]
OnApplied = Callable[[Events], None]


class SkippedEvent(TypedDict):
    """An event the views passed over, and why."""

    position: int
    chat_id: str
    topic: str
    error: str
    skipped_at: str


def tracked(tx: Tx) -> int:
    """The notification id up to which the views are built."""
    row = tx.one("SELECT position FROM view_tracking WHERE name = ?", (TRACKED,))
    return int(row[0]) if row else 0


def apply(db: Database, notifications: Sequence[Notification], mapper: Mapper[UUID],
          on_applied: OnApplied | None = None) -> tuple[int, int]:
    """Projects ``notifications`` and records their position; returns the tracked position
    afterwards and how many events were skipped (see ``Views.apply``)."""
    try:
        return _apply(db, notifications, mapper, on_applied), 0
    except Exception as exc:
        if not _unprojectable(exc):
            raise
        if len(notifications) == 1:
            return _skip(db, notifications[0], exc)
    position = skipped = 0
    for notification in notifications:
        try:
            position = _apply(db, [notification], mapper, on_applied)
        except Exception as exc:
            if not _unprojectable(exc):
                raise
            position, passed_over = _skip(db, notification, exc)
            skipped += passed_over
    return position, skipped


def _apply(db: Database, notifications: Sequence[Notification], mapper: Mapper[UUID],
           on_applied: OnApplied | None) -> int:
    with db.write() as tx:
        position = tracked(tx)
        if not notifications or notifications[-1].id <= position:
            return position
        fresh = [e for n in notifications
                 if n.id > position and (e := _readable(mapper, n)) is not None]
        batch = Batch(tx)
        for event in fresh:
            if isinstance(event, ChatSession.Deleted):
                batch.flush()  # what the batch holds of the chat goes with it
                forget_chat(tx, str(event.originator_id))
                batch = Batch(tx)
            else:
                projector.apply(batch.rows, event)
        batch.flush()
        position = notifications[-1].id
        tx.run("UPDATE view_tracking SET position = ? WHERE name = ?", (position, TRACKED))
    if on_applied is not None:
        on_applied(fresh)
    return position


def _readable(mapper: Mapper[UUID], notification: Notification
              ) -> DomainEventProtocol[UUID] | None:
    """The notification's event; None for an event of a deleted chat (unreadable)."""
    try:
        return mapper.to_domain_event(notification)
    except ChatDeletedError:
        return None


def _skip(db: Database, notification: Notification, exc: Exception) -> tuple[int, int]:
    """Records ``notification`` as skipped, with its position; returns the position and 1
    (0 when the views were already past it)."""
    error = f"{type(exc).__name__}: {exc}"[:2000]
    log.error("views: event %d (%s of chat %s) cannot be projected and is skipped: %s",
              notification.id, notification.topic, notification.originator_id, error)
    with db.write() as tx:
        position = tracked(tx)
        if notification.id <= position:
            return position, 0
        tx.run("INSERT INTO view_skipped (position, chat_id, topic, error, skipped_at)"
               " VALUES (?, ?, ?, ?, ?) ON CONFLICT (position) DO NOTHING",
               (notification.id, str(notification.originator_id),
                clean_text(notification.topic), clean_text(error), _now()))
        tx.run("UPDATE view_tracking SET position = ? WHERE name = ?",
               (notification.id, TRACKED))
    return notification.id, 1


def read_skipped(tx: Tx, limit: int) -> tuple[int, list[SkippedEvent]]:
    """How many events the views passed over, and the latest ``limit``."""
    total = int(tx.value("SELECT COUNT(*) FROM view_skipped"))
    rows = tx.all("SELECT position, chat_id, topic, error, skipped_at FROM view_skipped"
                  " ORDER BY position DESC LIMIT ?", (limit,))
    return total, [SkippedEvent(position=position, chat_id=chat_id, topic=topic, error=error,
                                skipped_at=skipped_at)
                   for position, chat_id, topic, error, skipped_at in rows]


def _unprojectable(exc: Exception) -> bool:
    """True for a fault of the events themselves, which retrying would not cure: the
    database refused a value, or decoding or a handler failed. A database that cannot be
    reached (any other ``ViewStoreError``) is worth retrying."""
    return isinstance(exc, ViewDataError) or not isinstance(exc, ViewStoreError)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
