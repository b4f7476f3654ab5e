"""The cluster's dedicated PostgreSQL connections (the leases', the bus's ``LISTEN`` and
``NOTIFY``): their kinds and how they are made again. The connections themselves are
``app.storage.postgres.connect`` ones: bounded, and named ``eventchat-<kind>`` (with the
schema) for ``pg_stat_activity``; the leases' runs its statements without a timeout, since
one cancelled would drop every lease held on it."""

from __future__ import annotations

from ..storage.postgres import Connection as Connection

#: Waits between two attempts to make a lost connection again.
BACKOFF_START_S = 0.1
#: Longest pause between two tries: a database back from a restart is used within 2 s.
BACKOFF_MAX_S = 2.0
#: The kind of each dedicated connection (its ``application_name`` is ``eventchat-<kind>``).
LEASES = "leases"
LISTEN = "listen"
NOTIFY = "notify"


def reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
