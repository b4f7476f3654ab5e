"""The views' database: SQLite next to the events, or the events' PostgreSQL schema.

Both dialects are reached through ``Tx``, a cursor that speaks ``?`` placeholders, so the
projection and the queries are written once. ``write()`` is one transaction that holds the
projection's write lock (``BEGIN IMMEDIATE`` on SQLite, a row lock on the tracking row on
PostgreSQL), so two runners, in one process or several, never interleave. Every call here is
blocking: callers run it in a worker thread. Database failures are raised as
``ViewStoreError`` (``from`` the driver's error).
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg_pool import ConnectionPool

from ..config import Settings
from ..events.postgres import application_name, connection_bounds, reconnect_timeout
from .errors import ViewDataError, ViewStoreError

#: Name of the followed application in the tracking table.
TRACKED = "eventchat"

_TABLES = ("view_tracking", "view_chats", "view_messages", "view_counters", "view_sketches",
           "view_search", "view_skipped")

_COMMON_DDL = [
    "CREATE TABLE IF NOT EXISTS view_tracking ("
    " name TEXT PRIMARY KEY, position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS view_chats ("
    " chat_id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL,"
    " created_at TEXT NOT NULL, updated_at TEXT NOT NULL, model TEXT,"
    " message_count INTEGER NOT NULL, prompt_tokens BIGINT NOT NULL,"
    " completion_tokens BIGINT NOT NULL, total_tokens BIGINT NOT NULL,"
    " last_message_preview TEXT, current_seq INTEGER)",
    "CREATE INDEX IF NOT EXISTS view_chats_by_activity"
    " ON view_chats (owner, updated_at DESC, chat_id DESC)",
    "CREATE TABLE IF NOT EXISTS view_messages ("
    " chat_id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,"
    " created_at TEXT NOT NULL, client_message_id TEXT, response_id TEXT, status TEXT,"
    " model TEXT, usage TEXT, timing TEXT, tool_calls TEXT, error TEXT, finish_reason TEXT,"
    " PRIMARY KEY (chat_id, seq))",
    "CREATE TABLE IF NOT EXISTS view_counters ("
    " scope TEXT NOT NULL, name TEXT NOT NULL, value BIGINT NOT NULL,"
    " PRIMARY KEY (scope, name))",
    "CREATE TABLE IF NOT EXISTS view_sketches ("
    " scope TEXT NOT NULL, metric TEXT NOT NULL, bucket INTEGER NOT NULL,"
    " count BIGINT NOT NULL, PRIMARY KEY (scope, metric, bucket))",
    # events the views could not take (see ``Views.apply``), kept until the next rebuild
    "CREATE TABLE IF NOT EXISTS view_skipped ("
    " position BIGINT PRIMARY KEY, chat_id TEXT NOT NULL, topic TEXT NOT NULL,"
    " error TEXT NOT NULL, skipped_at TEXT NOT NULL)",
    "INSERT INTO view_tracking (name, position) VALUES ('" + TRACKED + "', 0)"
    " ON CONFLICT (name) DO NOTHING",
]

#: Columns added to ``view_messages`` since its first version: views made before get them
#: empty (``eventchat projections rebuild`` fills them from the log).
_ADDED_COLUMNS = (("finish_reason", "TEXT"),)

_SQLITE_DDL = [
    *_COMMON_DDL,
    "CREATE VIRTUAL TABLE IF NOT EXISTS view_search USING fts5("
    " content, owner UNINDEXED, chat_id UNINDEXED, seq UNINDEXED, role UNINDEXED,"
    " tokenize = 'porter unicode61')",
]

_POSTGRES_DDL = [
    *_COMMON_DDL,
    "CREATE TABLE IF NOT EXISTS view_search ("
    " owner TEXT NOT NULL, chat_id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL,"
    " content TEXT NOT NULL,"
    " tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED,"
    " PRIMARY KEY (chat_id, seq))",
    "CREATE INDEX IF NOT EXISTS view_search_tsv ON view_search USING GIN (tsv)",
]


@lru_cache(maxsize=256)
def _pg(statement: str) -> str:
    return statement.replace("?", "%s")


class Tx:
    """A cursor taking ``?`` placeholders on both dialects."""

    def __init__(self, cursor: Any, postgres: bool) -> None:
        self.cursor = cursor
        self.postgres = postgres

    def _sql(self, statement: str) -> str:
        return _pg(statement) if self.postgres else statement

    def run(self, statement: str, params: Sequence[Any] = ()) -> int:
        self.cursor.execute(self._sql(statement), params)
        return int(self.cursor.rowcount)

    def many(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.cursor.executemany(self._sql(statement), rows)

    def one(self, statement: str, params: Sequence[Any] = ()) -> Any:
        self.cursor.execute(self._sql(statement), params)
        return self.cursor.fetchone()

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        self.cursor.execute(self._sql(statement), params)
        return list(self.cursor.fetchall())


class Database:
    """Where the views live; see the module docstring."""

    postgres: bool = False
    location: str = ""

    def write(self) -> Any:
        raise NotImplementedError

    def read(self) -> Any:
        raise NotImplementedError

    def create(self) -> None:
        raise NotImplementedError

    def drop(self) -> None:
        with self.write() as tx:
            for table in _TABLES:
                tx.run(f"DROP TABLE IF EXISTS {table}")
        self.create()

    def close(self) -> None:
        raise NotImplementedError


class SQLiteDatabase(Database):
    """``data_dir/views.sqlite`` in WAL mode: one writer connection, pooled readers."""

    def __init__(self, path: Path) -> None:
        self.location = str(path)
        self._path = path
        self._write_lock = threading.Lock()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._writer = self._connect()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # a streaming reply rewrites its row at every batch: checkpoint often (128 pages,
            # 512 KiB) and truncate the WAL afterwards, so it never needs much disk
            conn.execute("PRAGMA wal_autocheckpoint=128")
            conn.execute("PRAGMA journal_size_limit=1048576")
        except sqlite3.Error as exc:
            raise ViewStoreError(f"views database unavailable: {exc}") from exc
        self._all.append(conn)
        return conn

    @contextmanager
    def write(self) -> Iterator[Tx]:
        with self._write_lock, _mapped():
            cursor = self._writer.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(cursor, postgres=False)
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Tx]:
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            with _mapped():
                cursor = conn.cursor()
                cursor.execute("BEGIN")
                try:
                    yield Tx(cursor, postgres=False)
                finally:
                    cursor.execute("ROLLBACK")
        finally:
            self._readers.put(conn)

    def create(self) -> None:
        with self.write() as tx:
            for statement in _SQLITE_DDL:
                tx.run(statement)
            columns = {row[1] for row in tx.all("PRAGMA table_info(view_messages)")}
            for column, kind in _ADDED_COLUMNS:
                if column not in columns:
                    tx.run(f"ALTER TABLE view_messages ADD COLUMN {column} {kind}")

    def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()


class PostgresDatabase(Database):
    """``view_*`` tables in the events' schema, through a psycopg connection pool."""

    postgres = True

    def __init__(self, url: str, schema: str, size: int, timeout_s: float = 5.0) -> None:
        self.location = f"{schema} schema"
        self._schema = schema

        def configure(conn: psycopg.Connection[Any]) -> None:
            conn.autocommit = True
            conn.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(schema)))
            conn.autocommit = False

        try:
            # every wait bounded: for a pooled connection (``timeout``) and on the wire
            self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                url, min_size=1, max_size=max(size, 2), configure=configure, open=True,
                kwargs=connection_bounds(timeout_s, application_name("views", schema)),
                timeout=max(1.0, timeout_s), reconnect_timeout=reconnect_timeout(timeout_s),
            )
            self._pool.wait(timeout=10)
        except psycopg.Error as exc:
            raise ViewStoreError(f"views database unavailable: {exc}") from exc

    @contextmanager
    def write(self) -> Iterator[Tx]:
        with _mapped(), self._pool.connection() as conn, conn.transaction():
            tx = Tx(conn.cursor(), postgres=True)
            tx.run("SELECT position FROM view_tracking WHERE name = ? FOR UPDATE", (TRACKED,))
            yield tx

    @contextmanager
    def read(self) -> Iterator[Tx]:
        with _mapped(), self._pool.connection() as conn, conn.transaction():
            yield Tx(conn.cursor(), postgres=True)

    def create(self) -> None:
        # CREATE ... IF NOT EXISTS still races between processes: serialise on a lock.
        with _mapped(), self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || 'views'))")
            for statement in _POSTGRES_DDL:
                conn.execute(statement)
            for column, kind in _ADDED_COLUMNS:
                conn.execute(f"ALTER TABLE view_messages ADD COLUMN IF NOT EXISTS {column} {kind}")

    def close(self) -> None:
        self._pool.close()


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError) as exc:
        raise ViewDataError(f"views database refused a value: {exc}") from exc
    except sqlite3.Error as exc:
        raise ViewStoreError(f"views database error: {exc}") from exc
    except (psycopg.DataError, psycopg.IntegrityError) as exc:
        raise ViewDataError(f"views database refused a value: {type(exc).__name__}: {exc}"
                            ) from exc
    except psycopg.Error as exc:
        raise ViewStoreError(f"views database error: {type(exc).__name__}: {exc}") from exc


def open_database(settings: Settings) -> Database:
    """Opens (and creates if needed) the views database for ``settings``' store."""
    db: Database
    if settings.database_url:
        db = PostgresDatabase(settings.database_url, settings.database_schema,
                              settings.store_threads, settings.store_timeout_s)
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = SQLiteDatabase(settings.data_dir / "views.sqlite")
    try:
        db.create()
    except BaseException:
        db.close()
        raise
    return db
