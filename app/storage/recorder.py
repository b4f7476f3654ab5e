"""The event store's persistence: the ``eventsourcing`` environment for our settings, and the
PostgreSQL recorder and factory that keep fences and deadlines.

``persistence_env(settings)`` turns ``Settings`` into the library's environment (a SQLite
file in the data dir, or PostgreSQL from the URL), so the store is a setting and never a
code path. On PostgreSQL it names:

- ``BoundedPostgresFactory``: the library's factory, whose pool's connections carry
  ``postgres.connection_bounds`` and whose datastore gives up at the calling thread's
  ``deadline``. The library retries a call whose connection failed up to 10 times, each
  attempt waiting up to the pool's timeout: inside ``deadline(seconds)`` (the event store's
  worker threads) it stops retrying once the time is up, so that a store call ends within
  about its deadline, while a connection lost once (a restarted server) is still replaced.
- ``FencedRecorder``: the library's application recorder, which also creates the chat
  leases' table and checks, in the transaction that inserts a chat's events, that the
  saving process still holds the chat's lease (``Fence``).

Both stores' recorders (``FencedRecorder``, ``ChainedSQLiteRecorder`` on SQLite) write the
audit chain's links of the events they insert in the inserting transaction.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from eventsourcing.persistence import (
    InfrastructureFactoryError,
    OperationalError,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore, PostgresFactory
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor, SQLiteDatastore
from psycopg import Connection, Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from ..config import Settings
from ..events.errors import FencedError
from .chain import ChainTable
from .postgres import application_name, connection_bounds, reconnect_timeout

#: The event-store application's name: its PostgreSQL tables are named after it.
APPLICATION_NAME = "eventchat"
#: One row per chat ever leased: the process holding it and its epoch, bumped at every take.
LEASES_TABLE = f"{APPLICATION_NAME}_leases"
#: The links of the audit chain (``app.storage.chain``), beside the events' table.
CHAIN_TABLE = f"{APPLICATION_NAME}_chain"
SQLITE_CHAIN_TABLE = "event_chain"
#: Environment keys of ``BoundedPostgresFactory`` (beside the library's ``POSTGRES_*``).
STORE_TIMEOUT_KEY = "POSTGRES_STORE_TIMEOUT"
APPLICATION_NAME_KEY = "POSTGRES_APPLICATION_NAME"


@dataclass(frozen=True, slots=True)
class Fence:
    """What a save of ``chat_id`` must prove: the chat's lease still has ``epoch``."""

    chat_id: UUID
    epoch: int


class FencedRecorder(PostgresApplicationRecorder):
    """The library's PostgreSQL recorder, with fencing.

    ``insert_events(..., fence=Fence(...))`` (``Application.save(chat, fence=...)`` passes it
    down) reads the chat's lease row ``FOR SHARE`` in the inserting transaction, before the
    events: if its epoch is not the fence's, the transaction is rolled back and
    ``FencedError`` raised (nothing written). The share lock holds until the commit, so a new
    owner's epoch bump waits for a save already past the check, and every later save of the
    old owner fails it. The leases' table is created with the events' table.

    The same transaction writes the new events' links of the audit chain
    (``app.storage.chain``), in the table ``CHAIN_TABLE`` created with the events' table.
    """

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        if datastore.enable_db_functions:  # that path inserts outside a transaction of ours
            raise ValueError("fenced saves need POSTGRES_ENABLE_DB_FUNCTIONS off")
        super().__init__(datastore, events_table_name=events_table_name)
        table = SQL("{}.{}").format(Identifier(datastore.schema), Identifier(LEASES_TABLE))
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (chat_id uuid PRIMARY KEY, "
                "holder text NOT NULL, epoch bigint NOT NULL)"
            ).format(table)
        )
        self.check_fence_statement = SQL(
            "SELECT epoch FROM {} WHERE chat_id = %s FOR SHARE"
        ).format(table)
        schema = _quoted(datastore.schema or "public")
        self.chain = ChainTable(f"{schema}.{_quoted(events_table_name)}",
                                f"{schema}.{_quoted(CHAIN_TABLE)}",
                                f"{schema}.{_quoted(CHAIN_TABLE + '_state')}", postgres=True)
        for statement in self.chain.create_statements():
            self.sql_create_statements.append(SQL(statement))  # type: ignore[arg-type]

    def _insert_events(
        self,
        curs: Cursor[DictRow],
        stored_events: Sequence[StoredEvent],
        *,
        fence: Fence | None = None,
        **kwargs: Any,
    ) -> None:
        super()._insert_events(curs, stored_events, **kwargs)
        if fence is not None:
            curs.execute(self.check_fence_statement, (fence.chat_id,), prepare=True)
            row = curs.fetchone()
            if row is None or row["epoch"] != fence.epoch:
                raise FencedError(f"chat {fence.chat_id} is leased by another process now")
        self.chain.link_inserted(curs, stored_events)

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids: Sequence[int] | None = super().insert_events(stored_events, **kwargs)
        self.chain.committed()
        return ids


class ChainedSQLiteRecorder(SQLiteApplicationRecorder):
    """The library's SQLite recorder; the transaction that inserts events also writes their
    links of the audit chain (``app.storage.chain``), in the table ``event_chain`` created
    with the events' table. The events go first, so the transaction holds the write lock
    before it reads the chat's last link."""

    def __init__(self, datastore: SQLiteDatastore, events_table_name: str = "stored_events"):
        self.chain = ChainTable(events_table_name, SQLITE_CHAIN_TABLE,
                                SQLITE_CHAIN_TABLE + "_state", postgres=False)
        super().__init__(datastore, events_table_name)

    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), *self.chain.create_statements()]

    def create_table(self) -> None:
        # Two processes opening a store written before the chain both upgrade their read of
        # the schema to the write that creates its table: SQLite refuses one at once
        # ("database is locked", no busy wait on such a deadlock). It tries again.
        for attempt in range(20):
            try:
                super().create_table()
                return
            except OperationalError as exc:
                if "locked" not in str(exc) or attempt == 19:
                    raise
                time.sleep(0.05)

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = super()._insert_events(c, stored_events, **kwargs)
        self.chain.link_inserted(c, stored_events)
        return ids

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids: Sequence[int] | None = super().insert_events(stored_events, **kwargs)
        self.chain.committed()
        return ids


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_call = threading.local()


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """For the block, in this thread: the event store stops retrying a failed connection
    once ``seconds`` have passed (see the module docstring)."""
    _call.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _call.deadline = None


class DeadlineDatastore(PostgresDatastore):
    """The library's datastore, whose connections are refused once the calling thread's
    ``deadline`` has passed: the error ends the library's retries (it is not one it
    retries), and the store reports itself unavailable."""

    @contextmanager
    def get_connection(self) -> Iterator[Connection[DictRow]]:
        at = getattr(_call, "deadline", None)
        if at is not None and time.monotonic() >= at:
            raise PersistenceError("PostgreSQL did not answer in time")
        with super().get_connection() as conn:
            yield conn


class BoundedPostgresFactory(PostgresFactory):
    """The library's PostgreSQL factory; its pool's connections carry ``connection_bounds``
    for ``POSTGRES_STORE_TIMEOUT`` seconds and ``POSTGRES_APPLICATION_NAME``, and its
    datastore gives up at the calling thread's ``deadline``. (The pool's wait for a free
    connection is the library's ``POSTGRES_CONNECT_TIMEOUT``.)"""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        # the library builds its datastore itself: make it the one that keeps deadlines
        self.datastore.__class__ = DeadlineDatastore
        try:
            timeout_s = float(self.env.get(STORE_TIMEOUT_KEY) or "5")
        except ValueError as exc:
            raise InfrastructureFactoryError(f"{STORE_TIMEOUT_KEY} must be a number") from exc
        name = self.env.get(APPLICATION_NAME_KEY) or application_name("events")
        pool = self.datastore.pool
        assert isinstance(pool.kwargs, dict)  # the library passes a dict; the pool is not open
        pool.kwargs.update(connection_bounds(timeout_s, name))
        # a lost connection is made again with growing pauses (1, 2, 4... s): give up such a
        # chain soon, so that the next call after an outage connects at once
        pool.reconnect_timeout = reconnect_timeout(timeout_s)


def persistence_env(settings: Settings) -> dict[str, str]:
    """The ``eventsourcing`` environment for ``settings``' store, cipher and compressor."""
    env: dict[str, str] = {}
    if settings.database_url:
        env.update(postgres_env(settings.database_url, settings.database_schema))
        env["APPLICATION_RECORDER_TOPIC"] = f"{__name__}:{FencedRecorder.__qualname__}"
        env["POSTGRES_POOL_SIZE"] = str(settings.store_threads)
        env["POSTGRES_MAX_OVERFLOW"] = "0"
        env.update(bounded_env(settings.store_timeout_s, settings.database_schema))
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        env["PERSISTENCE_MODULE"] = "eventsourcing.sqlite"
        env["SQLITE_DBNAME"] = str(settings.data_dir / "events.sqlite")
        env["SQLITE_LOCK_TIMEOUT"] = str(max(1, math.ceil(settings.store_timeout_s)))
        env["APPLICATION_RECORDER_TOPIC"] = f"{__name__}:{ChainedSQLiteRecorder.__qualname__}"
    if settings.cipher_key:
        env["CIPHER_TOPIC"] = "eventsourcing.cipher:AESCipher"
        env["CIPHER_KEY"] = settings.cipher_key
    if settings.compress:
        env["COMPRESSOR_TOPIC"] = "eventsourcing.compressor:ZlibCompressor"
    return env


def postgres_env(url: str, schema: str = "public") -> dict[str, str]:
    """Splits a ``postgresql://user:password@host:port/dbname`` URL into the library's keys."""
    parts = urlsplit(url)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(parts.path.lstrip("/")) or "postgres",
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
        "POSTGRES_CONNECT_TIMEOUT": "5",
    }
    if schema and schema != "public":
        env["POSTGRES_SCHEMA"] = schema
    return env


def bounded_env(timeout_s: float, schema: str = "public") -> Mapping[str, str]:
    """The keys that bound the event store's waits for a store timeout of ``timeout_s``:
    ``BoundedPostgresFactory``, the connect timeout (also the longest wait for a pooled
    connection) and the lock timeout of an insert."""
    seconds = str(max(1, math.ceil(timeout_s)))
    return {
        "PERSISTENCE_MODULE": f"{__name__}:{BoundedPostgresFactory.__qualname__}",
        "POSTGRES_CONNECT_TIMEOUT": seconds,
        "POSTGRES_LOCK_TIMEOUT": seconds,
        STORE_TIMEOUT_KEY: str(timeout_s),
        APPLICATION_NAME_KEY: application_name("events", schema),
    }
