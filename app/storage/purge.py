"""The purge step after deletions: the deleted rows' bytes leave the database files.

Deleting a chat removes its rows from the views and destroys its key, but databases keep
deleted rows' bytes until their space is reused: SQLite in free pages and in its write-ahead
log, PostgreSQL in dead tuples (and, after a plain ``VACUUM``, possibly in the free space of
its pages). ``purge(settings)`` (``eventchat purge``) makes them go:

- SQLite (``views.sqlite``, ``events.sqlite``): the search index's segments are merged
  (FTS5 ``optimize``: the deleted messages' words leave the index), the write-ahead log is
  checkpointed and truncated, the file is rebuilt (``VACUUM``) and the log truncated again;
- PostgreSQL: ``VACUUM`` of every table of the schema (their TOAST tables included);
  ``full=True`` runs ``VACUUM FULL``, which rewrites each table into new files (and locks it
  meanwhile), so that nothing of a deleted row stays in the data files.

It may run while the server serves: on SQLite it waits (up to ``BUSY_TIMEOUT_S``) for the
transactions in progress, and writers wait while a file is rebuilt. Blocking; raises
``sqlite3.Error`` or ``psycopg.Error``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from psycopg import sql

from ..config import Settings
from . import postgres

BUSY_TIMEOUT_S = 30.0
#: The SQLite files of the data dir that hold chat data, and their FTS5 tables.
SQLITE_FILES = {"views.sqlite": ("view_search",), "events.sqlite": ()}


def purge(settings: Settings, full: bool = False,
          say: Callable[[str], None] = lambda line: None) -> None:
    """Runs the purge step on ``settings``' store; ``say`` is told what was done."""
    if settings.database_url:
        _purge_postgres(settings, full, say)
    else:
        _purge_sqlite(settings, say)


def _purge_sqlite(settings: Settings, say: Callable[[str], None]) -> None:
    for name, fts_tables in SQLITE_FILES.items():
        path = settings.data_dir / name
        if not path.exists():
            continue
        started = time.monotonic()
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        try:
            for table in fts_tables:
                conn.execute(f"INSERT INTO {table} ({table}) VALUES ('optimize')")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
        note = " (the log is still in use: run it again when idle)" if busy else ""
        say(f"{path}: rebuilt, log truncated in {time.monotonic() - started:.2f} s{note}")


def _purge_postgres(settings: Settings, full: bool, say: Callable[[str], None]) -> None:
    schema = settings.database_schema
    with postgres.connect(settings, "purge", statement_timeout=False) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename",
            (schema,))]
        vacuum = sql.SQL("VACUUM (FULL) {}.{}" if full else "VACUUM {}.{}")
        for table in tables:
            started = time.monotonic()
            conn.execute(vacuum.format(sql.Identifier(schema), sql.Identifier(table)))
            say(f"{schema}.{table}: {'VACUUM FULL' if full else 'VACUUM'}"
                f" in {time.monotonic() - started:.2f} s")
