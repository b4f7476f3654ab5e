"""PostgreSQL connections that never wait without bound, and schema creation that is safe
when several processes start at once.

A worker thread blocked on a server that does not answer cannot be cancelled from trio, so
every connection this package opens carries libpq's own bounds (``connection_bounds``): a
connect timeout, TCP keepalives and a user timeout (a server that vanished is noticed within
about twice the store timeout), and a ``statement_timeout`` (a server that is there but
stuck). Each kind of connection has an ``application_name`` of its own (``eventchat-events``,
``eventchat-views``, ``eventchat-users``, ...; with the schema appended when it is not
``public``), so ``pg_stat_activity`` tells them apart.

``BoundedPostgresFactory`` is the ``eventsourcing`` PostgreSQL factory with those bounds on
every pool connection (``persistence_env`` names it). The library retries a call whose
connection failed up to 10 times, each attempt waiting up to the pool's timeout: inside
``deadline(seconds)`` (the event store's worker threads) it stops retrying once the time is
up, so that a store call ends within about its deadline instead of ten times the driver's
bounds, while a connection lost once (a restarted server) is still replaced transparently.
``schema_lock`` serialises the
``CREATE ... IF NOT EXISTS`` of concurrent starts on an advisory lock: PostgreSQL's own
checks race between sessions ("relation ... already exists").
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from eventsourcing.persistence import InfrastructureFactoryError, PersistenceError
from eventsourcing.postgres import PostgresDatastore, PostgresFactory
from psycopg import sql

#: Environment keys of ``BoundedPostgresFactory`` (beside the library's ``POSTGRES_*``).
STORE_TIMEOUT_KEY = "POSTGRES_STORE_TIMEOUT"
APPLICATION_NAME_KEY = "POSTGRES_APPLICATION_NAME"
#: A statement may run this many store timeouts before the server cancels it.
STATEMENT_TIMEOUTS = 2
KEEPALIVE_PROBES = 3
#: The advisory lock every process takes around the creation of its tables.
SCHEMA_LOCK = "SELECT pg_advisory_lock(hashtext('eventchat-schema:' || %s))"
SCHEMA_UNLOCK = "SELECT pg_advisory_unlock(hashtext('eventchat-schema:' || %s))"


def application_name(kind: str, schema: str = "public") -> str:
    """``eventchat-<kind>``, with ``:<schema>`` when the schema is not ``public``."""
    name = f"eventchat-{kind}" if schema in ("", "public") else f"eventchat-{kind}:{schema}"
    return name[:63]


def reconnect_timeout(timeout_s: float) -> float:
    """How long a pool keeps trying to replace a lost connection before it lets the next
    caller start again (its pauses grow: 1, 2, 4... s)."""
    return max(2.0, timeout_s)


def connection_bounds(timeout_s: float, name: str) -> dict[str, Any]:
    """libpq keywords bounding every wait of a connection, for a store timeout of
    ``timeout_s``: connect, dead peer (keepalives, unacknowledged data) and statements."""
    seconds = max(2, math.ceil(timeout_s))
    interval = max(1, math.ceil(seconds / KEEPALIVE_PROBES))
    dead_after_s = seconds + interval * KEEPALIVE_PROBES
    statement_ms = round(max(timeout_s, 1.0) * STATEMENT_TIMEOUTS * 1000)
    return {
        "connect_timeout": seconds,
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": interval,
        "keepalives_count": KEEPALIVE_PROBES,
        "tcp_user_timeout": dead_after_s * 1000,
        "application_name": name,
        "options": f"-c statement_timeout={statement_ms}",
    }


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
    def get_connection(self) -> Iterator[Any]:
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


def bounded_env(timeout_s: float, schema: str = "public") -> dict[str, str]:
    """The ``eventsourcing`` keys that bound the event store's waits for a store timeout of
    ``timeout_s``: this factory, the connect timeout (also the longest wait for a pooled
    connection) and the lock timeout of an insert."""
    seconds = str(max(1, math.ceil(timeout_s)))
    return {
        "PERSISTENCE_MODULE": f"{__name__}:{BoundedPostgresFactory.__qualname__}",
        "POSTGRES_CONNECT_TIMEOUT": seconds,
        "POSTGRES_LOCK_TIMEOUT": seconds,
        STORE_TIMEOUT_KEY: str(timeout_s),
        APPLICATION_NAME_KEY: application_name("events", schema),
    }


@contextmanager
def schema_lock(url: str, schema: str, timeout_s: float) -> Iterator[psycopg.Connection[Any]]:
    """Creates ``schema`` if needed and holds its creation lock for the block, on a
    connection of its own (autocommit, yielded): one process at a time creates tables.
    Raises ``psycopg.Error`` when PostgreSQL fails."""
    bounds = connection_bounds(timeout_s, application_name("schema", schema))
    with psycopg.connect(url, autocommit=True, **bounds) as conn:
        conn.execute(SCHEMA_LOCK, (schema,))
        try:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            yield conn
        finally:
            if not conn.closed:
                conn.execute(SCHEMA_UNLOCK, (schema,))
