"""The views' database: SQLite next to the events, or the events' PostgreSQL schema.

Both are reached through ``sql.Tx`` (``?`` placeholders), so the projection and the queries
are written once. ``write()`` is one transaction that holds the projection's write lock
(``BEGIN IMMEDIATE`` on SQLite, a row lock on the tracking row on PostgreSQL), so two
writers, in one process or several, never interleave. Every call here is blocking: callers
run it in a worker thread. Database failures are raised as ``ViewStoreError`` (``from`` the
driver's error), values the database refuses as ``ViewDataError``.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import psycopg

from ..config import Settings
from . import postgres
from .errors import ViewDataError, ViewStoreError
from .sql import Tx
from .tables import ADDED_COLUMNS, POSTGRES_DDL, SQLITE_DDL, TABLES, TRACKED


class Database(ABC):
    """Where the views live; see the module docstring."""

    #: Where, for people: a file name or a schema.
    location: str = ""

    @abstractmethod
    def write(self) -> AbstractContextManager[Tx]:
        """One write transaction, holding the views' write lock."""

    @abstractmethod
    def read(self) -> AbstractContextManager[Tx]:
        """One read-only transaction."""

    @abstractmethod
    def create(self) -> None:
        """Creates the tables if needed, and the columns added since."""

    @abstractmethod
    def close(self) -> None: ...

    def drop(self) -> None:
        """Drops every view and creates them again, empty."""
        with self.write() as tx:
            for table in TABLES:
                tx.run(f"DROP TABLE IF EXISTS {table}")
        self.create()


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
                yield Tx(cursor)
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
                    yield Tx(cursor)
                finally:
                    cursor.execute("ROLLBACK")
        finally:
            self._readers.put(conn)

    def create(self) -> None:
        with self.write() as tx:
            for statement in SQLITE_DDL:
                tx.run(statement)
            for table, column, kind in ADDED_COLUMNS:
                columns = {row[1] for row in tx.all(f"PRAGMA table_info({table})")}
                if column not in columns:
                    tx.run(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()


class PostgresDatabase(Database):
    """``view_*`` tables in the events' schema, through a pool (``postgres.pool``)."""

    def __init__(self, settings: Settings) -> None:
        self.location = f"{settings.database_schema} schema"
        try:
            # every wait bounded: for a pooled connection and on the wire
            self._pool = postgres.pool(settings, "views", settings.store_threads)
        except psycopg.Error as exc:
            raise ViewStoreError(f"views database unavailable: {exc}") from exc

    @contextmanager
    def write(self) -> Iterator[Tx]:
        with _mapped(), self._pool.connection() as conn, conn.transaction():
            tx = Tx(conn.cursor())
            tx.run("SELECT position FROM view_tracking WHERE name = ? FOR UPDATE", (TRACKED,))
            yield tx

    @contextmanager
    def read(self) -> Iterator[Tx]:
        with _mapped(), self._pool.connection() as conn, conn.transaction():
            yield Tx(conn.cursor())

    def create(self) -> None:
        # CREATE ... IF NOT EXISTS still races between processes: serialise on a lock.
        with _mapped(), self._pool.connection() as conn, conn.transaction():
            tx = Tx(conn.cursor())
            tx.run("SELECT pg_advisory_xact_lock(hashtext(current_schema() || 'views'))")
            for statement in POSTGRES_DDL:
                tx.run(statement)
            for table, column, kind in ADDED_COLUMNS:
                tx.run(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")

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
        db = PostgresDatabase(settings)
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = SQLiteDatabase(settings.data_dir / "views.sqlite")
    try:
        db.create()
    except BaseException:
        db.close()
        raise
    return db
