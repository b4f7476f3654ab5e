"""A chat as the views showed it right after any event: ``GET /chat/{id}?at_seq=N``.

The chat's events up to ``N`` go through the views' own event-to-row handlers
(``projector.apply``) into rows in memory, from the chat's first event (nothing is read from
the views), and the page is cut as ``Views.messages`` cuts it (the active branch, each
message with its siblings: ``views.branch_seqs``). So a reply that was streaming at ``N``
has status ``streaming`` and its text so far, exactly as the views held it then. Blocking
(it reads the log): the web layer runs it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from uuid import UUID

from ..events.application import ChatApplication
from ..events.domain import ChatSession
from ..events.replay import chat_events
from ..events.tree import Node, Tree
from .batch import Rows
from .projector import Unseen, apply
from .rows import ChatDict, ChatRow, MessageDict, MessageRow, chat_dict, message_dict
from .views import branch_seqs


class SeqOutOfRangeError(ValueError):
    """``at_seq`` is beyond the chat's last event."""

    def __init__(self, last_seq: int) -> None:
        super().__init__(f"at_seq is beyond the chat's last event ({last_seq})")
        self.last_seq = last_seq


def rows_at(
    app: ChatApplication, chat_id: UUID, at_seq: int | None = None
) -> tuple[ChatRow, list[MessageRow]]:
    """The chat's row and its messages' rows, oldest first, as the views held them right
    after event ``at_seq`` (the latest if None). Raises ``ChatNotFoundError`` and
    ``SeqOutOfRangeError``."""
    events = chat_events(app, chat_id, at_seq)
    if at_seq is not None and events[-1].originator_version < at_seq:
        raise SeqOutOfRangeError(events[-1].originator_version)
    return rows_of(events)


def rows_of(events: Sequence[ChatSession.Event]) -> tuple[ChatRow, list[MessageRow]]:
    """The rows one chat's events give, from its first event (``Started``) on."""
    rows = Rows(Unseen(), counting=False)
    for event in events:
        apply(rows, event)
    messages = sorted(rows.messages.values(), key=lambda row: row.seq)
    return rows.chat(str(events[0].originator_id)), [row.stored() for row in messages]


def chat_page_at(
    app: ChatApplication, chat_id: UUID, at_seq: int, limit: int = 100,
    before_seq: int | None = None,
) -> tuple[ChatDict, list[MessageDict], bool]:
    """The chat, a page of its messages (the latest ``limit`` before ``before_seq``, oldest
    first) and whether older ones remain, as the views held them right after event
    ``at_seq``. Raises ``ChatNotFoundError`` and ``SeqOutOfRangeError``."""
    chat, rows = rows_at(app, chat_id, at_seq)
    page, more = page_of(chat, rows, limit, before_seq)
    return chat_dict(chat), page, more


def page_of(chat: ChatRow, rows: Sequence[MessageRow], limit: int,
            before_seq: int | None = None, after_seq: int | None = None,
            ) -> tuple[list[MessageDict], bool]:
    """A page of the chat's messages (``rows``, oldest first) as ``Views.messages`` cuts it:
    of the active branch (``branch_seqs``, each message with its siblings) once the chat has
    a leaf."""
    if chat.leaf_seq is None:
        if after_seq is not None:
            kept = [row for row in rows if row.seq > after_seq]
            return [message_dict(row) for row in kept[:limit]], len(kept) > limit
        kept = [row for row in rows if before_seq is None or row.seq < before_seq]
        return [message_dict(row) for row in kept[-limit:]], len(kept) > limit
    tree = tree_of(rows)
    by_seq = {row.seq: row for row in rows}
    seqs, more = branch_seqs(tree, chat.leaf_seq, limit, before_seq, after_seq)
    return [message_dict(by_seq[seq], tree.siblings(seq)) for seq in seqs], more


class RowsSoFar:
    """One chat's rows, built event by event (a replay's views as they were at each
    event): ``apply`` each event in order, ``page`` reads them as ``page_of`` does."""

    def __init__(self) -> None:
        self.rows = Rows(Unseen(), counting=False)

    def apply(self, event: ChatSession.Event) -> None:
        apply(self.rows, event)

    def page(self, chat_id: str, limit: int, after_seq: int | None = None
             ) -> tuple[list[MessageDict], bool]:
        chat = self.rows.chat(chat_id)
        messages = sorted(self.rows.messages.values(), key=lambda row: row.seq)
        return page_of(chat, [row.stored() for row in messages], limit, after_seq=after_seq)


def tree_of(rows: Iterable[MessageRow]) -> Tree:
    return Tree(Node(row.seq, row.role, row.parent_seq) for row in rows)


def active_branch(chat: ChatRow, rows: Sequence[MessageRow]) -> list[MessageRow]:
    """The messages of the chat's active branch, in order (every message before the chat
    has a leaf)."""
    if chat.leaf_seq is None:
        return list(rows)
    by_seq = {row.seq: row for row in rows}
    return [by_seq[seq] for seq in tree_of(rows).path(chat.leaf_seq)]
