"""The changes a run of events makes to the views, gathered in memory and written at once.

``Rows`` holds the rows a run of events touches, loaded once (from a ``RowSource``) and
changed in memory, so a run of ``TokensGenerated`` costs one string append each; counters
and sketch buckets are summed in memory. ``Batch`` is ``Rows`` over one write transaction:
``flush()`` writes every row back with one statement per table (``executemany`` on SQLite,
``unnest``ed arrays on PostgreSQL) and adds the counters and buckets to theirs. The caller
commits the flush and the tracking position together, which is what makes the views exactly
once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..events.text import clean_text
from ..storage.sql import Row, Tx
from . import sketch
from .rows import ChatRow, MessageRow

SEP = "\x1f"  # separates the parts of scope and counter names; never in user text we key on


def chat_scope(chat_id: str) -> str:
    return f"chat{SEP}{chat_id}"


def user_scope(owner: str) -> str:
    return f"user{SEP}{owner}"


def model_scope(scope: str, model: str) -> str:
    return f"{scope}{SEP}model{SEP}{model}"


class RowSource(Protocol):
    """Where ``Rows`` finds a row it has not seen yet (None: there is none)."""

    def chat(self, chat_id: str) -> ChatRow | None: ...

    def message(self, chat_id: str, seq: int) -> MessageRow | None: ...


class StoredRows:
    """Rows read from the views, in ``tx``."""

    def __init__(self, tx: Tx) -> None:
        self.tx = tx

    def chat(self, chat_id: str) -> ChatRow | None:
        row = self.tx.one(f"{ChatRow.SELECT} WHERE chat_id = ?", (chat_id,))
        return None if row is None else ChatRow.from_row(row)

    def message(self, chat_id: str, seq: int) -> MessageRow | None:
        row = self.tx.one(f"{MessageRow.SELECT} WHERE chat_id = ? AND seq = ?", (chat_id, seq))
        return None if row is None else MessageRow.from_row(row)


class Rows:
    """The rows and stats a run of events changes; ``counting=False`` keeps no stats."""

    def __init__(self, source: RowSource, *, counting: bool = True) -> None:
        self.source = source
        self.counting = counting
        self.chats: dict[str, ChatRow] = {}
        self.messages: dict[tuple[str, int], MessageRow] = {}
        self.search: list[tuple[str, str, str, int, str]] = []
        self.counters: Counter[tuple[str, str]] = Counter()
        self.buckets: Counter[tuple[str, str, int]] = Counter()
        #: (owner, UTC day, model) -> responses and tokens, added to ``view_usage``.
        self.usage: dict[tuple[str, str, str], Counter[str]] = {}

    def chat(self, chat_id: str) -> ChatRow:
        row = self.chats.get(chat_id)
        if row is None:
            row = self.source.chat(chat_id)
            if row is None:
                raise LookupError(f"chat {chat_id} has no Started event before this one")
            self.chats[chat_id] = row
        return row

    def message(self, chat_id: str, seq: int) -> MessageRow:
        row = self.messages.get((chat_id, seq))
        if row is None:
            row = self.source.message(chat_id, seq)
            if row is None:
                raise LookupError(f"message {seq} of chat {chat_id} is missing")
            self.messages[(chat_id, seq)] = row
        return row

    def current(self, chat: ChatRow) -> MessageRow:
        if chat.current_seq is None:
            raise LookupError(f"chat {chat.chat_id} has no response in progress")
        return self.message(chat.chat_id, chat.current_seq)

    def count(self, chat: ChatRow, name: str, value: int = 1) -> None:
        if self.counting:
            for scope in ("all", user_scope(chat.owner), chat_scope(chat.chat_id)):
                self.counters[(scope, name)] += value

    def use(self, chat: ChatRow, day: str, model: str, tokens: Mapping[str, int]) -> None:
        """Counts one response of ``chat``'s owner on ``day`` with ``model`` and its tokens."""
        if self.counting:
            used = self.usage.setdefault((chat.owner, day, model), Counter())
            used["responses"] += 1
            used.update(tokens)

    def sample(self, chat: ChatRow, metric: str, value: object, model: str | None = None
               ) -> None:
        if not self.counting or not isinstance(value, int | float):
            return
        bucket = sketch.bucket_of(float(value))
        for scope in ("all", user_scope(chat.owner), chat_scope(chat.chat_id)):
            self.buckets[(scope, metric, bucket)] += 1
            if model is not None:
                self.buckets[(model_scope(scope, model), metric, bucket)] += 1


class Batch:
    """``Rows`` read from and written to one write transaction of the views."""

    def __init__(self, tx: Tx) -> None:
        self.tx = tx
        self.rows = Rows(StoredRows(tx))

    def flush(self) -> None:
        tx, rows = self.tx, self.rows
        UPSERT_CHAT.write(tx, [row.to_row() for row in rows.chats.values()])
        UPSERT_MESSAGE.write(tx, [row.to_row() for row in rows.messages.values()])
        INSERT_SEARCH.write(tx, list(rows.search))
        ADD_COUNTER.write(tx, [(s, n, v) for (s, n), v in rows.counters.items() if v])
        ADD_BUCKET.write(tx, [(s, m, b, c) for (s, m, b), c in rows.buckets.items()])
        ADD_USAGE.write(tx, [(*key, *(used[c] for c in USAGE_COLUMNS))
                             for key, used in rows.usage.items()])


@dataclass(frozen=True)
class Upsert:
    """An ``INSERT ... ON CONFLICT`` of many rows: ``executemany`` on SQLite, one statement
    over ``unnest``ed column arrays on PostgreSQL (one round trip per table and batch)."""

    table: str
    columns: tuple[str, ...]
    pg_types: tuple[str, ...]
    on_conflict: str

    def write(self, tx: Tx, rows: Sequence[Row]) -> None:
        if not rows:
            return
        # Events recorded before the text rules (``app.events.text``) may hold characters
        # that the databases refuse: the views hold them as U+FFFD.
        rows = [tuple(clean_text(v) if type(v) is str else v for v in row) for row in rows]
        names = ", ".join(self.columns)
        if tx.postgres:
            arrays = ", ".join(f"%b::{t}[]" for t in self.pg_types)  # binary: no escaping
            tx.run(f"INSERT INTO {self.table} ({names}) SELECT * FROM unnest({arrays})"
                   f" {self.on_conflict}", [list(column) for column in zip(*rows, strict=True)])
        else:
            marks = ", ".join("?" for _ in self.columns)
            tx.many(f"INSERT INTO {self.table} ({names}) VALUES ({marks}) {self.on_conflict}",
                    rows)


def _replace(table: str, columns: tuple[str, ...], pg_types: str, key: str) -> Upsert:
    keys = {k.strip() for k in key.split(",")}
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
    return Upsert(table, columns, tuple(pg_types.split()),
                  f"ON CONFLICT ({key}) DO UPDATE SET {updates}")


UPSERT_CHAT = _replace("view_chats", ChatRow.COLUMNS,
                       "text text text text text text int int8 int8 int8 text int int text",
                       "chat_id")
UPSERT_MESSAGE = _replace("view_messages", MessageRow.COLUMNS,
                          "text int text text text text text text text text text text text text"
                          " int", "chat_id, seq")
ADD_COUNTER = Upsert("view_counters", ("scope", "name", "value"), ("text", "text", "int8"),
                     "ON CONFLICT (scope, name)"
                     " DO UPDATE SET value = view_counters.value + excluded.value")
ADD_BUCKET = Upsert("view_sketches", ("scope", "metric", "bucket", "count"),
                    ("text", "text", "int", "int8"),
                    "ON CONFLICT (scope, metric, bucket)"
                    " DO UPDATE SET count = view_sketches.count + excluded.count")
USAGE_COLUMNS = ("responses", "prompt_tokens", "completion_tokens", "total_tokens")
ADD_USAGE = Upsert("view_usage", ("owner", "day", "model", *USAGE_COLUMNS),
                   ("text", "text", "text", "int8", "int8", "int8", "int8"),
                   "ON CONFLICT (owner, day, model) DO UPDATE SET "
                   + ", ".join(f"{c} = view_usage.{c} + excluded.{c}" for c in USAGE_COLUMNS))
INSERT_SEARCH = Upsert("view_search", ("content", "owner", "chat_id", "seq", "role"),
                       ("text", "text", "text", "int", "text"), "")
