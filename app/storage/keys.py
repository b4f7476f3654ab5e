"""The chats' data keys table, beside the events (``app.events.keys`` uses it).

One row per chat written with a key of its own: the key (wrapped by ``EVENTCHAT_CIPHER_KEY``
when one is set, else as is), whether it is wrapped, when it was made and, once the chat is
deleted, when it was destroyed: the key is then NULL. A chat with no row was written before
per-chat keys (its events have the old form). The table lives in the events' database, reached
through the ``eventsourcing`` datastore (its pool and its deadlines): ``chat_keys`` in
``events.sqlite``, ``eventchat_chat_keys`` in the schema on PostgreSQL. Every call is blocking
and raises the library's (SQLite) or the driver's (PostgreSQL) errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.postgres import PostgresDatastore
from eventsourcing.sqlite import SQLiteDatastore

SQLITE_TABLE = "chat_keys"
POSTGRES_TABLE = "eventchat_chat_keys"


@dataclass(frozen=True, slots=True)
class KeyRow:
    #: None once destroyed.
    key: bytes | None
    wrapped: bool


class KeyTable:
    """The statements of the keys table on the events' datastore (either store)."""

    def __init__(self, datastore: SQLiteDatastore | PostgresDatastore) -> None:
        self.datastore = datastore
        self.postgres = isinstance(datastore, PostgresDatastore)
        if isinstance(datastore, PostgresDatastore):
            schema = '"' + (datastore.schema or "public").replace('"', '""') + '"'
            self.table = f'{schema}."{POSTGRES_TABLE}"'
            self.name = f"{datastore.schema or 'public'}.{POSTGRES_TABLE}"
        else:
            self.table = self.name = SQLITE_TABLE

    def create(self) -> None:
        if self.postgres:
            ddl = (f"CREATE TABLE IF NOT EXISTS {self.table} (chat_id uuid PRIMARY KEY,"
                   " data_key bytea, wrapped boolean NOT NULL, created_at timestamptz NOT NULL,"
                   " destroyed_at timestamptz)")
        else:
            ddl = (f"CREATE TABLE IF NOT EXISTS {self.table} (chat_id TEXT PRIMARY KEY,"
                   " data_key BLOB, wrapped INTEGER NOT NULL, created_at TEXT NOT NULL,"
                   " destroyed_at TEXT)")
        self._run(ddl, (), commit=True)

    def read(self, chat_id: UUID) -> KeyRow | None:
        """The chat's row, or None when it has none (written before per-chat keys)."""
        rows = self._run(f"SELECT data_key, wrapped FROM {self.table} WHERE chat_id = ?",
                         (self._id(chat_id),), commit=False)
        if not rows:
            return None
        key, wrapped = rows[0]
        return KeyRow(None if key is None else bytes(key), bool(wrapped))

    def insert(self, chat_id: UUID, key: bytes, wrapped: bool) -> KeyRow:
        """Stores the chat's new key unless it has one (or had one); returns the row kept."""
        self._run(f"INSERT INTO {self.table} (chat_id, data_key, wrapped, created_at)"
                  " VALUES (?, ?, ?, ?) ON CONFLICT (chat_id) DO NOTHING",
                  (self._id(chat_id), key, wrapped, self._now()), commit=True)
        row = self.read(chat_id)
        assert row is not None
        return row

    def destroy(self, chat_id: UUID) -> None:
        """Destroys the chat's key (a chat with no row gets one, keyless: it stays deleted)."""
        now = self._now()
        self._run(f"INSERT INTO {self.table} (chat_id, data_key, wrapped, created_at,"
                  " destroyed_at) VALUES (?, NULL, ?, ?, ?) ON CONFLICT (chat_id) DO UPDATE"
                  " SET data_key = NULL, destroyed_at = excluded.destroyed_at",
                  (self._id(chat_id), False, now, now), commit=True)

    def first_wrapped(self) -> KeyRow | None:
        """One live key, wrapped or not, to check the master key against at start-up."""
        rows = self._run(f"SELECT data_key, wrapped FROM {self.table}"
                         " WHERE data_key IS NOT NULL ORDER BY wrapped DESC LIMIT 1", (),
                         commit=False)
        return KeyRow(bytes(rows[0][0]), bool(rows[0][1])) if rows else None

    def _id(self, chat_id: UUID) -> object:
        return chat_id if self.postgres else str(chat_id)

    def _now(self) -> object:
        now = datetime.now(UTC)
        return now if self.postgres else now.isoformat(timespec="seconds")

    def _run(self, statement: str, params: tuple[object, ...], *, commit: bool
             ) -> list[tuple[Any, ...]]:
        if self.postgres:
            statement = statement.replace("?", "%s")
        with self.datastore.transaction(commit=commit) as wrapper:
            cursor: Any = getattr(wrapper, "sqlite_cursor", wrapper)  # the library wraps SQLite's
            cursor.execute(statement, params)
            if cursor.description is None:
                return []
            return [tuple(row.values()) if isinstance(row, dict) else tuple(row)
                    for row in cursor.fetchall()]
