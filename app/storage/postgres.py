"""PostgreSQL connections that never wait without bound, each named for ``pg_stat_activity``.

PostgreSQL is reached in two ways:

- **pools**: the event store's pool (the ``eventsourcing`` library's, configured by
  ``app.storage.recorder``) and the views' pool (``pool(...)``), for the short calls of
  many worker threads;
- **dedicated connections** (``connect(settings, kind)``), one per long-lived or occasional
  use: the users table, schema creation (``schema_lock``), the command line's and the
  bench's checks, the cluster's leases, ``LISTEN`` and ``NOTIFY`` connections
  (``app.actors.leases``, ``app.actors.bus``), each of a ``kind`` of its own.

A worker thread blocked on a server that does not answer cannot be cancelled from trio, so
every connection carries libpq's own bounds (``connection_bounds``): a connect timeout, TCP
keepalives and a user timeout (a server that vanished is noticed within about twice the
store timeout), and a ``statement_timeout`` (a server that is there but stuck; none on the
leases' connection, where a statement cancelled would drop every lease held on it). Each kind of
connection has an ``application_name`` of its own (``eventchat-events``, ``eventchat-views``,
``eventchat-users``, ...; with the schema appended when it is not ``public``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

from ..config import Settings

Connection = psycopg.Connection[Any]
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


def connection_bounds(timeout_s: float, name: str, *,
                      statement_timeout: bool = True) -> dict[str, str | int]:
    """libpq keywords bounding every wait of a connection, for a store timeout of
    ``timeout_s``: connect, dead peer (keepalives, unacknowledged data) and, unless
    ``statement_timeout`` is false (then none, whatever the server's default), statements."""
    seconds = max(2, math.ceil(timeout_s))
    interval = max(1, math.ceil(seconds / KEEPALIVE_PROBES))
    dead_after_s = seconds + interval * KEEPALIVE_PROBES
    statement_ms = round(max(timeout_s, 1.0) * STATEMENT_TIMEOUTS * 1000)
    if not statement_timeout:
        statement_ms = 0  # PostgreSQL's "no limit"
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


def connect(settings: Settings, kind: str, *, autocommit: bool = True,
            search_path: bool = False, statement_timeout: bool = True) -> Connection:
    """A dedicated connection to ``settings``' database (blocking), with the bounds of
    ``settings.store_timeout_s`` and the ``application_name`` of ``kind`` (``leases``,
    ``listen``, ``notify``, ...). With ``search_path`` unqualified names are those of
    ``settings.database_schema``; with ``statement_timeout=False`` its statements run
    unbounded (the connect and dead-peer bounds stay). Raises ``psycopg.Error``; close it
    when done (``with``)."""
    assert settings.database_url, "PostgreSQL connections need EVENTCHAT_DATABASE_URL"
    name = application_name(kind, settings.database_schema)
    bounds = connection_bounds(settings.store_timeout_s, name,
                               statement_timeout=statement_timeout)
    conn = psycopg.connect(make_conninfo(settings.database_url, **bounds), autocommit=True)
    if search_path:
        use_schema(conn, settings.database_schema)
    conn.autocommit = autocommit
    return conn


def use_schema(conn: Connection, schema: str) -> None:
    """Sets the session's ``search_path`` to ``schema`` (in autocommit, so that it stays)."""
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))


def pool(settings: Settings, kind: str, size: int) -> ConnectionPool[Connection]:
    """An open pool of up to ``size`` connections to ``settings``' schema (``search_path``),
    each bounded as ``connect``'s; a caller waits at most the store timeout for one.
    Raises ``psycopg.Error`` when no connection can be made within 10 s."""
    assert settings.database_url, "PostgreSQL connections need EVENTCHAT_DATABASE_URL"
    timeout_s, schema = settings.store_timeout_s, settings.database_schema

    def configure(conn: Connection) -> None:
        conn.autocommit = True
        use_schema(conn, schema)
        conn.autocommit = False

    opened: ConnectionPool[Connection] = ConnectionPool(
        settings.database_url, min_size=1, max_size=max(size, 2), configure=configure,
        open=True, kwargs=connection_bounds(timeout_s, application_name(kind, schema)),
        timeout=max(1.0, timeout_s), reconnect_timeout=reconnect_timeout(timeout_s),
    )
    try:
        opened.wait(timeout=10)
    except BaseException:
        opened.close()
        raise
    return opened


@contextmanager
def schema_lock(settings: Settings) -> Iterator[Connection]:
    """Creates ``settings``' schema if needed and holds its creation lock for the block, on
    a connection of its own (autocommit, ``search_path`` set, yielded): one process at a
    time creates tables (PostgreSQL's own ``IF NOT EXISTS`` checks race between sessions).
    Raises ``psycopg.Error`` when PostgreSQL fails."""
    schema = settings.database_schema
    with connect(settings, "schema") as conn:
        conn.execute(SCHEMA_LOCK, (schema,))
        try:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            use_schema(conn, schema)
            yield conn
        finally:
            if not conn.closed:
                conn.execute(SCHEMA_UNLOCK, (schema,))
