"""Users and their bearer tokens, in the same database as the events.

A token is ``secrets.token_urlsafe(32)``; only its SHA-256 is stored, so the database never
holds a usable credential. A user may have several tokens (``add_user`` on an existing name
adds one). SQLite: ``data_dir/users.sqlite``; PostgreSQL: table ``user_tokens`` in
``settings.database_schema``. Every method of ``UserStore`` is blocking: the async helpers
run them in worker threads. Database failures raise ``StoreUnavailableError``.

A token is listed by its id, the first 8 hex digits of its hash (``users list``), and
revoked by deleting its row (``users revoke NAME [--id ID]``). A running server trusts a
token it has checked for ``TOKEN_CACHE_S`` seconds: a revoked token is refused (401, and a
refused WebSocket handshake) within that time by every server sharing the table; WebSocket
connections it opened before stay open until they close.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import sql

from ..config import Settings
from ..events.errors import StoreUnavailableError
from ..events.postgres import application_name, connection_bounds, schema_lock

DEFAULT_USER = "local"
#: Seconds a running server trusts a token it has checked (a revocation's longest delay).
TOKEN_CACHE_S = 5.0
#: Hex digits of a token's hash that name it in ``users list`` and ``users revoke --id``.
TOKEN_ID_CHARS = 8
T = TypeVar("T")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as ``users list`` shows it: never the token, only an id from its hash."""

    name: str
    token_id: str
    created_at: str


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

    def tokens(self) -> list[TokenInfo]:
        """Every token, by user name then age."""
        rows = self._query("SELECT name, token_hash, created_at FROM {table}"
                           " ORDER BY name, created_at, token_hash")
        return [TokenInfo(str(name), digest[:TOKEN_ID_CHARS], _iso(created))
                for name, digest, created in rows]

    def revoke(self, name: str, token_id: str | None = None) -> int:
        """Deletes every token of ``name``, or the one whose id is ``token_id``; returns how
        many. Raises ``ValueError`` for an id that is not hex or names several tokens."""
        name = name.strip()
        if token_id is None:
            return self._execute("DELETE FROM {table} WHERE name = {p}", name)
        token_id = token_id.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", token_id):
            raise ValueError(f"a token id is hex digits, not {token_id!r}")
        rows = self._query("SELECT token_hash FROM {table} WHERE name = {p}", name)
        matches = [digest for (digest,) in rows if digest.startswith(token_id)]
        if len(matches) > 1:
            raise ValueError(f"token id {token_id} names {len(matches)} tokens: give more digits")
        if not matches:
            return 0
        return self._execute("DELETE FROM {table} WHERE token_hash = {p}", matches[0])

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM {table}")[0][0])

    def ping(self) -> None:
        self._query("SELECT 1")

    # -- internals ----------------------------------------------------------------------------

    def _execute(self, statement: str, *params: Any) -> int:
        """Runs ``statement``; returns the number of rows it changed."""
        with self._connection() as (conn, render):
            return int(conn.execute(render(statement), params).rowcount)

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
        conn = sqlite3.connect(self.settings.data_dir / "users.sqlite",
                               timeout=max(1.0, self.settings.store_timeout_s))
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

        url, schema = self.settings.database_url, self.settings.database_schema
        timeout_s = self.settings.store_timeout_s
        if not self._ready:  # one process at a time: concurrent starts would collide
            with schema_lock(url, schema, timeout_s) as conn:
                conn.execute(
                    render(
                        "CREATE TABLE IF NOT EXISTS {table} (token_hash TEXT PRIMARY KEY,"
                        " name TEXT NOT NULL, created_at TIMESTAMPTZ DEFAULT now())"
                    )
                )
            self._ready = True
        bounds = connection_bounds(timeout_s, application_name("users", schema))
        with psycopg.connect(url, **bounds) as conn:
            yield conn, render


class Authenticator:
    """Async token checks; a known token is trusted for ``ttl_s`` seconds without asking the
    store again, so a revoked one is refused at most ``ttl_s`` after its row is deleted.
    Unknown tokens are never cached. A store that does not answer within ``timeout_s``
    raises ``StoreUnavailableError`` (its worker thread is abandoned)."""

    MAX_CACHED = 10_000

    def __init__(self, users: UserStore, limiter: trio.CapacityLimiter | None = None,
                 ttl_s: float = TOKEN_CACHE_S, timeout_s: float | None = None) -> None:
        self.users = users
        self.limiter = limiter or trio.CapacityLimiter(4)
        self.ttl_s = ttl_s
        self.timeout_s = users.settings.store_timeout_s if timeout_s is None else timeout_s
        #: token hash -> (user name, trio clock time until which it is trusted)
        self._known: dict[str, tuple[str, float]] = {}

    async def user_for(self, token: str) -> str | None:
        """The user holding ``token``, or None; store failures raise ``StoreUnavailableError``."""
        digest, now = hash_token(token), trio.current_time()
        cached = self._known.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        name = await self.run(self.users.authenticate, token)
        if name is None:
            self._known.pop(digest, None)
            return None
        if len(self._known) >= self.MAX_CACHED:
            self._known = {k: v for k, v in self._known.items() if v[1] > now}
        if len(self._known) < self.MAX_CACHED:
            self._known[digest] = (name, now + self.ttl_s)
        return name

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a read of the user store, bounded by ``timeout_s`` (abandoned after it)."""
        with trio.move_on_after(self.timeout_s):
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter,
                                                 abandon_on_cancel=True)
        raise StoreUnavailableError(
            f"user store unavailable: no answer within {self.timeout_s:g} s"
        )


def add_user(settings: Settings, name: str) -> str:
    """Creates a bearer token for user ``name`` and returns it (blocking)."""
    return UserStore(settings).add_user(name)


def _iso(created: Any) -> str:
    """``created_at`` as ISO 8601 UTC (SQLite stores ``CURRENT_TIMESTAMP``'s UTC text)."""
    if isinstance(created, datetime):
        return created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{str(created).replace(' ', 'T')}Z" if created else ""


def ensure_default_user(settings: Settings) -> str | None:
    """Creates user ``local`` when there is no user at all; returns its token, else None."""
    users = UserStore(settings)
    if users.count():
        return None
    return users.add_user(DEFAULT_USER)
