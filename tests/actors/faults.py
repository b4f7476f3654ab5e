"""PostgreSQL faults for tests: terminating one server's dedicated connections.

Each helper finds its victims in ``pg_stat_activity`` by what only they can match (the
schema's channel, a chat's advisory lock), so that tests running at the same time on other
schemas are never hit.
"""

from __future__ import annotations

from uuid import UUID

import psycopg

from app.actors.cluster import lock_key
from app.actors.connections import LEASES, LISTEN
from app.storage.postgres import application_name


def _terminate(url: str, where: str, *params: object) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE " + where, params
        ).fetchall()
    return [pid for pid, done in rows if done]


def kill_listeners(url: str, schema: str) -> list[int]:
    """Terminates every connection LISTENing on ``schema``'s channel (every server's)."""
    return _terminate(
        url,
        "query LIKE 'LISTEN%%' AND query LIKE %s AND application_name = %s",
        f'%"eventchat_{schema}"%',
        application_name(LISTEN, schema),
    )


def kill_lease_holder(url: str, chat_id: UUID) -> list[int]:
    """Terminates the lease connection of the server that holds ``chat_id``'s lease (in
    whichever schema: its name starts with the leases' kind)."""
    key = lock_key(chat_id) & 0xFFFF_FFFF_FFFF_FFFF
    return _terminate(
        url,
        "application_name LIKE %s AND pid IN (SELECT pid FROM pg_locks WHERE locktype = "
        "'advisory' AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1)",
        application_name(LEASES) + "%",
        key >> 32,
        key & 0xFFFF_FFFF,
    )


def connection_names(url: str, schema: str) -> list[str]:
    """The ``application_name`` of the connections whose last query names ``schema``."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE query LIKE %s "
            "AND pid <> pg_backend_pid()",
            (f"%{schema}%",),
        ).fetchall()
    return sorted(name for (name,) in rows)
