"""The audit chain: each chat's events linked by SHA-256 over the bytes as stored.

``hash(n) = SHA-256(hash(n-1) || canonical(event n))`` with ``hash(0)`` = 32 zero bytes, and
``canonical`` as docs/audit.md defines it (the chat id, the event's version, its topic and
its state exactly as stored: ciphertext where the state is encrypted). Snapshots are not
linked.

The links live in a table of their own beside the library's events table, one row per
(chat, version), ``event_chain`` on SQLite and ``eventchat_chain`` in the schema on
PostgreSQL. ``ChainTable`` holds its statements for one store and is used in two ways:

- by the recorders (``app.storage.recorder``), in the transaction that inserts events:
  ``link_inserted`` reads the chat's last link and writes one row per new event, so a
  commit holds its events and their links or neither;
- by the audit (``app.events.audit``), in transactions of its own: reading a chat's events
  and links a page at a time, the chats' heads in chat-id order, and linking the chats
  that a store written before the chain holds (``unlinked_chats``, ``link_chat``).

Rows are written with ``ON CONFLICT DO NOTHING``: a link depends only on the events, so
two writers that link the same event (two processes linking an old store at once) write the
same row, and the second one changes nothing. Every call is blocking and raises the
driver's errors.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

#: ``hash(0)``: what the first event of every chat is linked to.
GENESIS = bytes(32)
#: Events read at a time when a chat is walked.
PAGE = 1000
#: The row of the state table written once every chat of the store has links.
ALL_LINKED = "all_chats_linked"
#: Chats whose last link a process keeps in memory (32 bytes each, and the key).
HEADS_KEPT = 10_000


def canonical(chat_id: UUID, version: int, topic: str, state: bytes) -> bytes:
    """The bytes of one stored event that its link covers (docs/audit.md): each field
    length-prefixed (4 bytes, big-endian), the version as 8 bytes big-endian."""
    cid = str(chat_id).encode("ascii")
    name = topic.encode("utf-8")
    return b"".join((
        struct.pack(">I", len(cid)), cid,
        struct.pack(">Q", version),
        struct.pack(">I", len(name)), name,
        struct.pack(">I", len(state)), state,
    ))


def link(previous: bytes, chat_id: UUID, version: int, topic: str, state: bytes) -> bytes:
    """``hash(n)`` from ``hash(n-1)`` and event ``n`` as stored."""
    return hashlib.sha256(previous + canonical(chat_id, version, topic, state)).digest()


@dataclass(frozen=True, slots=True)
class StoredRow:
    """One event as stored, with its link if it has one."""

    version: int
    topic: str | None
    state: bytes | None
    hash: bytes | None


class ChainTable:
    """The chain's statements on one store (see the module docstring).

    ``events``, ``chain`` and ``state`` are the tables' names as the statements write them
    (qualified by the schema on PostgreSQL); ``postgres`` selects the placeholders and how chat ids
    are stored (``uuid`` there, 32 hex digits in SQLite's events table and here).
    """

    def __init__(self, events: str, chain: str, state: str, *, postgres: bool) -> None:
        self.events = events
        self.chain = chain
        self.state = state
        self.postgres = postgres
        #: The heads this process committed, most recent last (``committed``).
        self._heads: OrderedDict[UUID, tuple[int, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        #: Per thread: the heads of the transaction being written.
        self._pending = threading.local()

    def create_statements(self) -> list[str]:
        """The links' table, and the one row that says every chat was linked once."""
        if self.postgres:
            return [f"CREATE TABLE IF NOT EXISTS {self.chain} (chat_id uuid NOT NULL, "
                    "version bigint NOT NULL, hash bytea NOT NULL, "
                    "PRIMARY KEY (chat_id, version))",
                    f"CREATE TABLE IF NOT EXISTS {self.state} (name text PRIMARY KEY, "
                    "at timestamptz NOT NULL DEFAULT now())"]
        return [f"CREATE TABLE IF NOT EXISTS {self.chain} (chat_id TEXT NOT NULL, "
                "version INTEGER NOT NULL, hash BLOB NOT NULL, "
                "PRIMARY KEY (chat_id, version)) WITHOUT ROWID",
                f"CREATE TABLE IF NOT EXISTS {self.state} (name TEXT PRIMARY KEY, "
                "at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"]

    def key(self, chat_id: UUID | str) -> object:
        """A chat id as this store's tables hold it."""
        chat = chat_id if isinstance(chat_id, UUID) else UUID(chat_id)
        return chat if self.postgres else chat.hex

    def _sql(self, statement: str) -> str:
        statement = statement.format(events=self.events, chain=self.chain, state=self.state)
        return statement.replace("?", "%s") if self.postgres else statement

    def _run(self, curs: Any, statement: str, params: Sequence[object] = ()) -> None:
        if self.postgres:
            curs.execute(self._sql(statement), params, prepare=True)
        else:
            curs.execute(self._sql(statement), params)

    # -- in the inserting transaction --------------------------------------------------

    def link_inserted(self, curs: Any, stored_events: Sequence[Any]) -> None:
        """Writes the links of ``stored_events`` (the library's ``StoredEvent``s, in the
        order they are inserted), in ``curs``' transaction. A chat whose earlier events are
        not linked yet (a store written before the chain) is linked from its first one.

        The chat's last link is read from the table, unless this process committed it
        itself (``committed``): an actor saving its chat again needs no read."""
        previous: dict[UUID, tuple[int, bytes]] = {}
        rows: list[tuple[object, int, bytes]] = []
        for event in stored_events:
            chat_id = UUID(str(event.originator_id))
            version = event.originator_version
            if chat_id not in previous:
                previous[chat_id] = self._before(curs, chat_id, version)
                if previous[chat_id][0] < version - 1:
                    gap = self._link_range(curs, chat_id, *previous[chat_id], version - 1)
                    rows.extend(gap)
                    if gap:
                        previous[chat_id] = (gap[-1][1], gap[-1][2])
            digest = link(previous[chat_id][1], chat_id, version, event.topic, event.state)
            previous[chat_id] = (version, digest)
            rows.append((self.key(chat_id), version, digest))
        self.insert(curs, rows)
        self._pending.heads = previous

    def _before(self, curs: Any, chat_id: UUID, version: int) -> tuple[int, bytes]:
        """The chat's link before ``version``: none for a new chat's first event, the one
        this process committed last if it is that one, else the table's last."""
        if version == 1:
            return 0, GENESIS
        with self._lock:
            known = self._heads.get(chat_id)
        if known is not None and known[0] == version - 1:
            return known
        return self._last_link(curs, chat_id)

    def committed(self) -> None:
        """The transaction of this thread's last ``link_inserted`` committed: its chats'
        heads are known without a read from now on (a bounded number of chats)."""
        heads: dict[UUID, tuple[int, bytes]] = getattr(self._pending, "heads", {})
        self._pending.heads = {}
        with self._lock:
            for chat_id, head in heads.items():
                self._heads[chat_id] = head
                self._heads.move_to_end(chat_id)
            while len(self._heads) > HEADS_KEPT:
                self._heads.popitem(last=False)

    def _last_link(self, curs: Any, chat_id: UUID) -> tuple[int, bytes]:
        self._run(curs, "SELECT version, hash FROM {chain} WHERE chat_id = ? "
                        "ORDER BY version DESC LIMIT 1", (self.key(chat_id),))
        row = curs.fetchone()
        return (0, GENESIS) if row is None else (int(row["version"]), bytes(row["hash"]))

    def _link_range(self, curs: Any, chat_id: UUID, after: int, previous: bytes, until: int
                    ) -> list[tuple[object, int, bytes]]:
        """Links the stored events ``after < version <= until`` that follow ``previous``."""
        rows = []
        for version, topic, state in self._events(curs, chat_id, after, until):
            previous = link(previous, chat_id, version, topic, state)
            rows.append((self.key(chat_id), version, previous))
        return rows

    def insert(self, curs: Any, rows: Sequence[tuple[object, int, bytes]]) -> None:
        if not rows:
            return
        if self.postgres:  # one statement for the batch, whatever its size
            chats, versions, hashes = (list(column) for column in zip(*rows, strict=True))
            self._run(curs, "INSERT INTO {chain} (chat_id, version, hash) SELECT * FROM "
                            "unnest(?::uuid[], ?::bigint[], ?::bytea[]) ON CONFLICT DO NOTHING",
                      (chats, versions, hashes))
            return
        curs.executemany(self._sql("INSERT INTO {chain} (chat_id, version, hash) "
                                   "VALUES (?, ?, ?) ON CONFLICT DO NOTHING"), rows)

    # -- reads, in transactions of their own -------------------------------------------

    def _events(self, curs: Any, chat_id: UUID, after: int, until: int
                ) -> list[tuple[int, str, bytes]]:
        self._run(curs, "SELECT originator_version, topic, state FROM {events} "
                        "WHERE originator_id = ? AND originator_version > ? "
                        "AND originator_version <= ? ORDER BY originator_version",
                  (self.key(chat_id), after, until))
        return [(int(r["originator_version"]), str(r["topic"]), bytes(r["state"]))
                for r in curs.fetchall()]

    def hashes(self, curs: Any, chat_id: UUID, after: int, until: int) -> dict[int, bytes]:
        """The links of ``chat_id`` with ``after < version <= until``."""
        self._run(curs, "SELECT version, hash FROM {chain} WHERE chat_id = ? AND version > ? "
                        "AND version <= ? ORDER BY version", (self.key(chat_id), after, until))
        return {int(r["version"]): bytes(r["hash"]) for r in curs.fetchall()}

    def links_after(self, curs: Any, chat_id: UUID, after: int, limit: int
                    ) -> list[tuple[int, bytes]]:
        """At most ``limit`` links of ``chat_id`` after version ``after``, in order."""
        self._run(curs, "SELECT version, hash FROM {chain} WHERE chat_id = ? AND version > ? "
                        "ORDER BY version LIMIT ?", (self.key(chat_id), after, limit))
        return [(int(r["version"]), bytes(r["hash"])) for r in curs.fetchall()]

    def extent(self, curs: Any, chat_id: UUID) -> tuple[int, int, bytes]:
        """The chat's last event version, and its last link (version, hash): zeros and
        ``GENESIS`` where there is none."""
        self._run(curs, "SELECT MAX(originator_version) AS last FROM {events} "
                        "WHERE originator_id = ?", (self.key(chat_id),))
        row = curs.fetchone()
        last = int(row["last"]) if row is not None and row["last"] is not None else 0
        head, digest = self._last_link(curs, chat_id)
        return last, head, digest

    def page(self, curs: Any, chat_id: UUID, after: int, until: int) -> list[StoredRow]:
        """Every version ``after < v <= until`` with its event and its link, each None
        where the store has none."""
        events = {v: (t, s) for v, t, s in self._events(curs, chat_id, after, until)}
        hashes = self.hashes(curs, chat_id, after, until)
        rows = []
        for v in range(after + 1, until + 1):
            topic, state = events.get(v, (None, None))
            rows.append(StoredRow(v, topic, state, hashes.get(v)))
        return rows

    def chats(self, curs: Any, after: UUID | None, limit: int) -> list[UUID]:
        """Chats with events or links, in chat-id order, after ``after``."""
        start = None if after is None else self.key(after)
        where_e = "WHERE originator_id > ?" if start is not None else ""
        where_c = "WHERE chat_id > ?" if start is not None else ""
        params = (start, start, limit) if start is not None else (limit,)
        self._run(curs, f"SELECT chat_id FROM (SELECT DISTINCT originator_id AS chat_id FROM "
                        f"{{events}} {where_e} UNION SELECT DISTINCT chat_id FROM {{chain}} "
                        f"{where_c}) AS ids ORDER BY chat_id LIMIT ?", params)
        return [UUID(str(r["chat_id"])) for r in curs.fetchall()]

    def count_chats(self, curs: Any) -> int:
        self._run(curs, "SELECT COUNT(*) AS n FROM (SELECT originator_id AS chat_id FROM "
                        "{events} UNION SELECT chat_id FROM {chain}) AS ids")
        row = curs.fetchone()
        return int(row["n"]) if row is not None else 0

    def unlinked_chats(self, curs: Any, after: UUID | None, limit: int) -> list[UUID]:
        """Chats that have events and no link at all (written before the chain), in
        chat-id order, after ``after``."""
        start = None if after is None else self.key(after)
        where = "AND e.originator_id > ?" if start is not None else ""
        params = (start, limit) if start is not None else (limit,)
        self._run(curs, "SELECT e.originator_id AS chat_id FROM {events} e "
                        "WHERE e.originator_version = 1 AND NOT EXISTS (SELECT 1 FROM {chain} c "
                        f"WHERE c.chat_id = e.originator_id) {where} "
                        "ORDER BY e.originator_id LIMIT ?", params)
        return [UUID(str(r["chat_id"])) for r in curs.fetchall()]

    def all_linked(self, curs: Any) -> bool:
        """Whether a pass of ``unlinked_chats`` found every chat linked (since then, every
        chat is linked by the transactions that write it)."""
        self._run(curs, "SELECT name FROM {state} WHERE name = ?", (ALL_LINKED,))
        return curs.fetchone() is not None

    def mark_all_linked(self, curs: Any) -> None:
        self._run(curs, "INSERT INTO {state} (name) VALUES (?) ON CONFLICT DO NOTHING",
                  (ALL_LINKED,))

    def links_of(self, curs: Any, chat_id: UUID) -> Iterator[tuple[object, int, bytes]]:
        """The links of every stored event of ``chat_id`` from its first, a page at a
        time (for a chat that has none yet)."""
        previous, after = GENESIS, 0
        while True:
            rows = self._link_range(curs, chat_id, after, previous, after + PAGE)
            yield from rows
            if not rows:
                return
            _, after, previous = rows[-1]
