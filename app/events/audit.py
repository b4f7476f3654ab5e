"""Checking the audit chain of the stored log (docs/audit.md).

Blocking, like the rest of the store's reads: the command line runs it directly, the web
layer in worker threads. Each chat is read in one read transaction (a consistent snapshot:
``REPEATABLE READ`` on PostgreSQL), a page of events at a time, so a long chat never sits in
memory whole; many chats are walked in chat-id order, a page of ids at a time.

A chat's verdict names the first seq that does not hold, and why:

- ``modified``: the event stored at that seq is not the one its link vouches for (its bytes
  changed, its link changed, or it has no link: it was added outside eventchat);
- ``reordered``: the event at that seq is one the chain holds at another seq;
- ``missing``: the chain links an event at that seq, and the log no longer has it, though it
  has later ones;
- ``truncated``: the log ends before the chain does (its tail was cut), or, against a
  checkpoint, the chain ends before the checkpoint's head.

A store written before the chain existed is linked by ``link_unlinked`` (the server's start
runs it until one pass is over, every ``eventchat audit`` command runs it): each chat that
has events and no link at all gets its links from its first event.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from ..storage.chain import GENESIS, PAGE, ChainTable, link
from .application import ChatApplication
from .errors import EventsError

Reason = Literal["modified", "missing", "reordered", "truncated"]
#: Chat ids read at a time when every chat is walked.
CHATS_PAGE = 500


class AuditError(EventsError):
    """An audit cannot be done as asked: no key to sign or check a checkpoint with, a
    checkpoint that is unreadable or not signed with that key, a chat the store does not
    hold."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a chat's chain says: its head, and the first seq that does not hold."""

    chat_id: UUID
    head_seq: int
    head_hash: bytes
    first_invalid_seq: int | None = None
    reason: Reason | None = None

    @property
    def valid(self) -> bool:
        return self.reason is None

    def broken(self, seq: int, reason: Reason) -> Verdict:
        return Verdict(self.chat_id, self.head_seq, self.head_hash, seq, reason)

    def as_json(self) -> dict[str, object]:
        """The body of ``GET /chat/{id}/audit``."""
        return {"chat_id": str(self.chat_id), "head_seq": self.head_seq,
                "head_hash": self.head_hash.hex(), "valid": self.valid,
                "first_invalid_seq": self.first_invalid_seq, "reason": self.reason}


def chain_table(app: ChatApplication) -> ChainTable:
    chain = getattr(app.recorder, "chain", None)
    if not isinstance(chain, ChainTable):
        raise TypeError(f"{type(app.recorder).__name__} keeps no audit chain")
    return chain


@contextmanager
def reading(app: ChatApplication) -> Iterator[Any]:
    """One read transaction on the event store, a consistent snapshot on both stores. The
    library's datastore raises the driver's errors as its own (``PersistenceError``s, which
    ``EventStore`` maps to ``StoreUnavailableError``)."""
    recorder: Any = app.recorder
    with recorder.datastore.transaction(commit=False) as curs:
        if chain_table(app).postgres:
            curs.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        yield curs


@contextmanager
def writing(app: ChatApplication) -> Iterator[Any]:
    """One write transaction on the event store."""
    recorder: Any = app.recorder
    with recorder.datastore.transaction(commit=True) as curs:
        yield curs


def verify_chat(app: ChatApplication, chat_id: UUID) -> Verdict | None:
    """The chat's verdict; None when the store holds neither events nor links of it."""
    chain = chain_table(app)
    with reading(app) as curs:
        last, head, digest = chain.extent(curs, chat_id)
        if not last and not head:
            return None
        verdict = Verdict(chat_id, head, digest)
        previous, after, end = GENESIS, 0, max(last, head)
        while after < end:
            for row in chain.page(curs, chat_id, after, min(after + PAGE, end)):
                n = row.version
                if row.topic is None or row.state is None:
                    return verdict.broken(n, "missing" if n < last else "truncated")
                if row.hash is None:
                    return verdict.broken(n, "modified")
                computed = link(previous, chat_id, n, row.topic, row.state)
                if computed != row.hash:
                    elsewhere = _linked_elsewhere(chain, curs, chat_id, n, row.topic, row.state)
                    return verdict.broken(n, "reordered" if elsewhere else "modified")
                previous = computed
            after = min(after + PAGE, end)
        return verdict


def _linked_elsewhere(chain: ChainTable, curs: Any, chat_id: UUID, seq: int, topic: str,
                      state: bytes) -> bool:
    """Whether the chain links this event's bytes at a seq other than ``seq`` (the links
    are read a page at a time, in order, whatever the gaps between their seqs)."""
    previous: tuple[int, bytes] = (0, GENESIS)
    while True:
        page = chain.links_after(curs, chat_id, previous[0], PAGE)
        for m, stored in page:
            if (m != seq and previous[0] == m - 1
                    and link(previous[1], chat_id, m, topic, state) == stored):
                return True
            previous = (m, stored)
        if len(page) < PAGE:
            return False


def against_checkpoint(app: ChatApplication, verdict: Verdict | None, chat_id: UUID,
                       seq: int, digest: bytes) -> Verdict:
    """``verdict`` checked against a checkpoint's head (``seq``, ``digest``) of the chat:
    a chain that ends before ``seq`` was truncated, one whose link at ``seq`` differs was
    rewritten at or before ``seq`` (reported at ``seq``: the checkpoint holds no more)."""
    if verdict is None:
        return Verdict(chat_id, 0, GENESIS, 1, "truncated")
    if not verdict.valid:
        return verdict
    if verdict.head_seq < seq:
        return verdict.broken(verdict.head_seq + 1, "truncated")
    with reading(app) as curs:
        stored = chain_table(app).hashes(curs, chat_id, seq - 1, seq).get(seq)
    return verdict if stored == digest else verdict.broken(seq, "modified")


def chat_ids(app: ChatApplication) -> Iterator[UUID]:
    """Every chat with events or links, in chat-id order, a page at a time."""
    chain, after = chain_table(app), None
    while True:
        with reading(app) as curs:
            page = chain.chats(curs, after, CHATS_PAGE)
        yield from page
        if len(page) < CHATS_PAGE:
            return
        after = page[-1]


def count_chats(app: ChatApplication) -> int:
    with reading(app) as curs:
        return chain_table(app).count_chats(curs)


def head(app: ChatApplication, chat_id: UUID) -> tuple[int, bytes]:
    """The chat's last link (seq, hash); (0, ``GENESIS``) when it has none."""
    with reading(app) as curs:
        _, seq, digest = chain_table(app).extent(curs, chat_id)
    return seq, digest


def link_unlinked(app: ChatApplication, *, unless_done: bool = False) -> int:
    """Links every chat that has events and no link (a store written before the chain),
    from its first event; returns how many. Idempotent, and safe while servers write and
    while another process does the same: links depend only on the events, and a link
    already there is kept. Once a pass is over, the store records it; with ``unless_done``
    (a server's start) a store that recorded one is not searched again."""
    chain, after, count = chain_table(app), None, 0
    if unless_done:
        with reading(app) as curs:
            if chain.all_linked(curs):
                return 0
    while True:
        with reading(app) as curs:
            page = chain.unlinked_chats(curs, after, CHATS_PAGE)
        for chat_id in page:
            with reading(app) as curs:
                rows = list(chain.links_of(curs, chat_id))
            with writing(app) as curs:
                chain.insert(curs, rows)
            count += 1
        if len(page) < CHATS_PAGE:
            break
        after = page[-1]
    with writing(app) as curs:
        chain.mark_all_linked(curs)
    return count
