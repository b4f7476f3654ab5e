"""Users and their bearer tokens, in the same database as the events.

A token is ``secrets.token_urlsafe(32)``; only its SHA-256 is stored, so the database never
holds a usable credential. A user may have several tokens (``add_user`` on an existing name
adds one). SQLite: ``data_dir/users.sqlite``; PostgreSQL: table ``user_tokens`` in
``settings.database_schema``. Every method of ``UserStore`` is blocking: the async helpers
run them in worker threads. Database failures raise ``StoreUnavailableError``.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import sql

from ..config import Settings
from ..events.errors import StoreUnavailableError
from ..events.store import ensure_schema

DEFAULT_USER = "local"
T = TypeVar("T")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class UserStore:
    """Blocking access to the ``user_tokens`` table."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = False

    # -- public, blocking -------------------------------------------------------------------

    def add_user(self, name: str) -> str:
        """Creates a token for ``name`` (and the user, if new); returns the token."""
        name = name.strip()
        if not name or len(name) > 100:
            raise ValueError("a user name must have 1 to 100 characters")
        token = secrets.token_urlsafe(32)
        self._execute(
            "INSERT INTO {table} (token_hash, name) VALUES ({p}, {p})", hash_token(token), name
        )
        return token

    def authenticate(self, token: str) -> str | None:
        """The name of the user holding ``token``, or None."""
        rows = self._query("SELECT name FROM {table} WHERE token_hash = {p}", hash_token(token))
        return str(rows[0][0]) if rows else None

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM {table}")[0][0])

    def ping(self) -> None:
        self._query("SELECT 1")

    # -- internals ----------------------------------------------------------------------------

    def _execute(self, statement: str, *params: Any) -> None:
        with self._connection() as (conn, render):
            conn.execute(render(statement), params)

    def _query(self, statement: str, *params: Any) -> list[Any]:
        with self._connection() as (conn, render):
            return list(conn.execute(render(statement), params).fetchall())

    @contextmanager
    def _connection(self) -> Iterator[tuple[Any, Callable[[str], Any]]]:
        try:
            if self.settings.database_url:
                with self._postgres() as pair:
                    yield pair
            else:
                with self._sqlite() as pair:
                    yield pair
        except (sqlite3.Error, psycopg.Error) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailableError(f"user store unavailable: {reason}") from exc

    @contextmanager
    def _sqlite(self) -> Iterator[tuple[Any, Callable[[str], Any]]]:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.settings.data_dir / "users.sqlite", timeout=10)
        try:
            with conn:
                if not self._ready:
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS user_tokens (token_hash TEXT PRIMARY KEY,"
                        " name TEXT NOT NULL, created_at TEXT DEFAULT CURRENT_TIMESTAMP)"
                    )
                    self._ready = True
                yield conn, lambda s: s.format(table="user_tokens", p="?")
        finally:
            conn.close()

    @contextmanager
    def _postgres(self) -> Iterator[tuple[Any, Callable[[str], Any]]]:
        assert self.settings.database_url
        table = sql.Identifier(self.settings.database_schema, "user_tokens")

        def render(statement: str) -> Any:
            return sql.SQL(statement).format(table=table, p=sql.Placeholder())

        if not self._ready:
            ensure_schema(self.settings.database_url, self.settings.database_schema)
        with psycopg.connect(self.settings.database_url, connect_timeout=5) as conn:
            if not self._ready:
                conn.execute(
                    render(
                        "CREATE TABLE IF NOT EXISTS {table} (token_hash TEXT PRIMARY KEY,"
                        " name TEXT NOT NULL, created_at TIMESTAMPTZ DEFAULT now())"
                    )
                )
                self._ready = True
            yield conn, render


class Authenticator:
    """Async token checks, with a small cache of known tokens (tokens are never revoked)."""

    def __init__(self, users: UserStore, limiter: trio.CapacityLimiter | None = None) -> None:
        self.users = users
        self.limiter = limiter or trio.CapacityLimiter(4)
        self._known: dict[str, str] = {}

    async def user_for(self, token: str) -> str | None:
        digest = hash_token(token)
        if digest in self._known:
            return self._known[digest]
        name = await self.run(self.users.authenticate, token)
        if name is not None and len(self._known) < 10_000:
            self._known[digest] = name
        return name

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)


def add_user(settings: Settings, name: str) -> str:
    """Creates a bearer token for user ``name`` and returns it (blocking)."""
    return UserStore(settings).add_user(name)


def ensure_default_user(settings: Settings) -> str | None:
    """Creates user ``local`` when there is no user at all; returns its token, else None."""
    users = UserStore(settings)
    if users.count():
        return None
    return users.add_user(DEFAULT_USER)
