"""The read side: chat lists, message pages, search and stats, all read from the views.

``Views`` is shared by the web layer (reads) and the ``ViewUpdater`` (writes through
``apply``). Its async methods run the blocking database work in worker threads through one
``CapacityLimiter``, and only read: a database that does not answer within ``timeout_s``
raises ``ViewStoreError``, and the worker thread is abandoned (as it is on cancellation; it
ends by itself within the driver's bounds). Database failures raise ``ViewStoreError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import ParamSpec, TypedDict, TypeVar
from uuid import UUID

import trio
from eventsourcing.persistence import Mapper, Notification

from ..config import Settings
from ..events.tree import Node, Tree
from ..storage.database import Database, open_database
from ..storage.errors import ViewStoreError
from ..storage.sql import Tx
from . import stats, tracking, usage
from .batch import chat_scope, user_scope
from .rows import (
    ChatDict,
    ChatRow,
    MessageDict,
    MessageRow,
    chat_cursor,
    chat_dict,
    cursor_position,
    message_dict,
)
from .search import Snippet, search_rows
from .stats import Stats
from .tracking import OnApplied, SkippedEvent
from .usage import DayUsage

T = TypeVar("T")
P = ParamSpec("P")


class SearchHit(TypedDict):
    chat: ChatDict
    snippets: list[Snippet]


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
        on_applied: OnApplied | None = None,
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
        position, skipped = tracking.apply(self.db, notifications, mapper, on_applied)
        self.skipped += skipped
        return position

    def read_skipped(self, limit: int = 100) -> tuple[int, list[SkippedEvent]]:
        """Blocking: how many events the views passed over, and the latest ``limit``."""
        with self.db.read() as tx:
            return tracking.read_skipped(tx, limit)

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
            return tracking.tracked(tx)

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
        after = cursor_position(cursor)
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
        return chats, chat_cursor(rows[limit - 1]) if more else None

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
            chat = _chat_row(tx, owner, chat_id)
            if chat is None:
                return [], False
            if chat.leaf_seq is not None:
                return branch_page(tx, chat_id, chat.leaf_seq, limit, before, after)
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
    ) -> Stats:
        """Stats (the contract's shape, without ``live``): overall, ``owner``'s, or one of
        ``owner``'s chats. A chat that is not ``owner``'s reads as empty stats."""
        return await self._run(self._stats, owner, None if chat_id is None else str(chat_id))

    def _stats(self, owner: str | None, chat_id: str | None) -> Stats:
        with self.db.read() as tx:
            if chat_id is not None:
                if owner is not None and _chat_row(tx, owner, chat_id) is None:
                    return stats.empty()
                return stats.read(tx, chat_scope(chat_id))
            if owner is not None:
                return stats.read(tx, user_scope(owner))
            return stats.read(tx, "all")

    async def usage(self, owner: str, since: str | None = None) -> list[DayUsage]:
        """``owner``'s tokens per UTC day and model, from day ``since`` (``YYYY-MM-DD``) on."""
        return await self._run(self._usage, owner, since)

    def _usage(self, owner: str, since: str | None) -> list[DayUsage]:
        with self.db.read() as tx:
            return usage.read(tx, owner, since)

    def close(self) -> None:
        self.db.close()


def open_views(settings: Settings) -> Views:
    """Opens the views for ``settings``' store, creating their tables if needed (blocking)."""
    return Views(open_database(settings), trio.CapacityLimiter(max(2, settings.store_threads)),
                 settings.store_timeout_s)


def branch_page(tx: Tx, chat_id: str, leaf: int, limit: int, before: int | None,
                after: int | None) -> tuple[list[MessageDict], bool]:
    """A page of the active branch that ends at ``leaf`` (as ``Views.messages`` pages),
    each message with its siblings."""
    tree = Tree(Node(seq, role, parent) for seq, role, parent in tx.all(
        "SELECT seq, role, parent_seq FROM view_messages WHERE chat_id = ?", (chat_id,)))
    page, more = branch_seqs(tree, leaf, limit, before, after)
    rows: dict[int, MessageRow] = {}
    for start in range(0, len(page), 500):
        chunk = page[start:start + 500]
        marks = ", ".join("?" for _ in chunk)
        for raw in tx.all(f"{MessageRow.SELECT} WHERE chat_id = ? AND seq IN ({marks})",
                          (chat_id, *chunk)):
            row = MessageRow.from_row(raw)
            rows[row.seq] = row
    return [message_dict(rows[seq], tree.siblings(seq)) for seq in page], more


def branch_seqs(tree: Tree, leaf: int, limit: int, before: int | None = None,
                after: int | None = None) -> tuple[list[int], bool]:
    """The seqs of a page of the branch that ends at ``leaf`` (after ``after``, else the
    latest before ``before``), and whether more remain beyond it (also used by
    ``timetravel``, over rows in memory)."""
    path = tree.path(leaf)
    if after is not None:
        page = [seq for seq in path if seq > after]
        return page[:limit], len(page) > limit
    bound = before if before is not None else 2**31 - 1
    page = [seq for seq in path if seq < bound]
    return page[-limit:], len(page) > limit


def _chat_row(tx: Tx, owner: str, chat_id: str) -> ChatRow | None:
    row = tx.one(f"{ChatRow.SELECT} WHERE chat_id = ? AND owner = ?", (chat_id, owner))
    return None if row is None else ChatRow.from_row(row)
