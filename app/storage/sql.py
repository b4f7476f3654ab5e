"""The one SQL dialect of eventchat's own tables: statements with ``?`` placeholders and
unqualified table names, run unchanged on SQLite and on PostgreSQL.

``Tx`` wraps a cursor of either driver. On PostgreSQL the placeholders become ``%s`` and the
connection's ``search_path`` names the schema (``postgres.connect(..., search_path=True)``,
``postgres.pool``); statements that differ between the two (full-text search, DDL, bulk
upserts) ask ``tx.postgres``. Every call is blocking and raises the driver's errors: each
store maps them to its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, TypeAlias

import psycopg

#: A row as the drivers return it: a tuple of column values.
Row: TypeAlias = tuple[Any, ...]
Params: TypeAlias = Sequence[object]
Cursor: TypeAlias = "sqlite3.Cursor | psycopg.Cursor[Row]"


@lru_cache(maxsize=256)
def _pg(statement: str) -> str:
    return statement.replace("?", "%s")


class Tx:
    """A cursor taking ``?`` placeholders on both dialects."""

    def __init__(self, cursor: Cursor) -> None:
        self.cursor = cursor
        self.postgres = isinstance(cursor, psycopg.Cursor)

    def _sql(self, statement: str) -> Any:
        # psycopg types its statements as literal strings; ours are built from constants
        return _pg(statement) if self.postgres else statement

    def run(self, statement: str, params: Params = ()) -> int:
        """Runs ``statement``; returns the number of rows it changed."""
        self.cursor.execute(self._sql(statement), params)
        return int(self.cursor.rowcount)

    def many(self, statement: str, rows: Sequence[Params]) -> None:
        if rows:
            self.cursor.executemany(self._sql(statement), rows)

    def one(self, statement: str, params: Params = ()) -> Row | None:
        self.cursor.execute(self._sql(statement), params)
        row: Row | None = self.cursor.fetchone()
        return row

    def all(self, statement: str, params: Params = ()) -> list[Row]:
        self.cursor.execute(self._sql(statement), params)
        rows: list[Row] = self.cursor.fetchall()
        return rows

    def value(self, statement: str, params: Params = ()) -> Any:
        """The first column of the first row, or None when there is no row."""
        row = self.one(statement, params)
        return None if row is None else row[0]
