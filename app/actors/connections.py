"""The cluster's dedicated PostgreSQL connections (the leases', the bus's ``LISTEN`` and
``NOTIFY``): each named for ``pg_stat_activity``, kept alive, and made again with backoff
after any error."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

Connection = psycopg.Connection[TupleRow]

#: Waits between two attempts to make a lost connection again.
BACKOFF_START_S = 0.1
#: Longest pause between two tries: a database back from a restart is used within 2 s.
BACKOFF_MAX_S = 2.0
#: A silent network loss fails a connection's calls within about 10 s instead of never.
KEEPALIVES: dict[str, int] = {
    "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
#: The ``application_name`` of each dedicated connection (``pg_stat_activity``).
LEASES_APP_NAME = "eventchat-leases"
LISTEN_APP_NAME = "eventchat-listen"
NOTIFY_APP_NAME = "eventchat-notify"


def connect(url: str, application_name: str) -> Connection:
    """A dedicated autocommit connection, named for ``pg_stat_activity`` (blocking)."""
    conninfo = make_conninfo(
        url, connect_timeout=5, application_name=application_name, **KEEPALIVES
    )
    return psycopg.connect(conninfo, autocommit=True)


def reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
