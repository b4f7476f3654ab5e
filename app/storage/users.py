"""Users and their bearer tokens, in the same database as the events.

A token is ``ec_`` and ``secrets.token_urlsafe(32)`` (the prefix names it for secret
scanners and keeps it from starting with ``-``, which a command line would read as an
option); only its SHA-256 is stored, so the database never
holds a usable credential. A user may have several tokens (``add_user`` on an existing name
adds one). SQLite: ``data_dir/users.sqlite``; PostgreSQL: table ``user_tokens`` in
``settings.database_schema``, on a connection of its own per call (``eventchat-users``).
Every method of ``UserStore`` is blocking (callers run it in a worker thread). Database
failures raise ``StoreUnavailableError``.

A token is listed by its id, the first 8 hex digits of its hash (``users list``), and
revoked by deleting its row (``users revoke NAME [--id ID]``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from ..config import Settings
from ..events.errors import StoreUnavailableError
from . import postgres
from .sql import Tx

DEFAULT_USER = "local"
#: What every token starts with (see the module docstring).
TOKEN_PREFIX = "ec_"
#: Hex digits of a token's hash that name it in ``users list`` and ``users revoke --id``.
TOKEN_ID_CHARS = 8
_SQLITE_TABLE = ("CREATE TABLE IF NOT EXISTS user_tokens (token_hash TEXT PRIMARY KEY,"
                 " name TEXT NOT NULL, created_at TEXT DEFAULT CURRENT_TIMESTAMP)")
_POSTGRES_TABLE = ("CREATE TABLE IF NOT EXISTS user_tokens (token_hash TEXT PRIMARY KEY,"
                   " name TEXT NOT NULL, created_at TIMESTAMPTZ DEFAULT now())")


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

    def add_user(self, name: str) -> str:
        """Creates a token for ``name`` (and the user, if new); returns the token."""
        name = name.strip()
        if not name or len(name) > 100:
            raise ValueError("a user name must have 1 to 100 characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as tx:
            tx.run("INSERT INTO user_tokens (token_hash, name) VALUES (?, ?)",
                   (hash_token(token), name))
        return token

    def authenticate(self, token: str) -> str | None:
        """The name of the user holding ``token``, or None."""
        with self._tx() as tx:
            name = tx.value("SELECT name FROM user_tokens WHERE token_hash = ?",
                            (hash_token(token),))
        return None if name is None else str(name)

    def tokens(self) -> list[TokenInfo]:
        """Every token, by user name then age."""
        with self._tx() as tx:
            rows = tx.all("SELECT name, token_hash, created_at FROM user_tokens"
                          " ORDER BY name, created_at, token_hash")
        return [TokenInfo(str(name), digest[:TOKEN_ID_CHARS], _iso(created))
                for name, digest, created in rows]

    def revoke(self, name: str, token_id: str | None = None) -> int:
        """Deletes every token of ``name``, or the one whose id is ``token_id``; returns how
        many. Raises ``ValueError`` for an id that is not hex or names several tokens."""
        name = name.strip()
        if token_id is None:
            with self._tx() as tx:
                return tx.run("DELETE FROM user_tokens WHERE name = ?", (name,))
        token_id = token_id.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", token_id):
            raise ValueError(f"a token id is hex digits, not {token_id!r}")
        with self._tx() as tx:
            rows = tx.all("SELECT token_hash FROM user_tokens WHERE name = ?", (name,))
        matches = [digest for (digest,) in rows if digest.startswith(token_id)]
        if len(matches) > 1:
            raise ValueError(f"token id {token_id} names {len(matches)} tokens: give more digits")
        if not matches:
            return 0
        with self._tx() as tx:
            return tx.run("DELETE FROM user_tokens WHERE token_hash = ?", (matches[0],))

    def count(self) -> int:
        with self._tx() as tx:
            return int(tx.value("SELECT COUNT(*) FROM user_tokens"))

    def ping(self) -> None:
        with self._tx() as tx:
            tx.run("SELECT 1")

    @contextmanager
    def _tx(self) -> Iterator[Tx]:
        """One transaction on a connection of its own (committed at the end of the block),
        with the table created first if this store has not done so yet."""
        try:
            if self.settings.database_url:
                with self._postgres() as tx:
                    yield tx
            else:
                with self._sqlite() as tx:
                    yield tx
        except (sqlite3.Error, psycopg.Error) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailableError(f"user store unavailable: {reason}") from exc

    @contextmanager
    def _sqlite(self) -> Iterator[Tx]:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.settings.data_dir / "users.sqlite",
                               timeout=max(1.0, self.settings.store_timeout_s))
        try:
            with conn:
                tx = Tx(conn.cursor())
                if not self._ready:
                    tx.run(_SQLITE_TABLE)
                    self._ready = True
                yield tx
        finally:
            conn.close()

    @contextmanager
    def _postgres(self) -> Iterator[Tx]:
        if not self._ready:  # one process at a time: concurrent starts would collide
            with postgres.schema_lock(self.settings) as conn:
                Tx(conn.cursor()).run(_POSTGRES_TABLE)
            self._ready = True
        with postgres.connect(self.settings, "users", autocommit=False,
                              search_path=True) as conn:
            yield Tx(conn.cursor())


def add_user(settings: Settings, name: str) -> str:
    """Creates a bearer token for user ``name`` and returns it (blocking)."""
    return UserStore(settings).add_user(name)


def ensure_default_user(settings: Settings) -> str | None:
    """Creates user ``local`` when there is no user at all; returns its token, else None."""
    users = UserStore(settings)
    if users.count():
        return None
    return users.add_user(DEFAULT_USER)


def _iso(created: object) -> str:
    """``created_at`` as ISO 8601 UTC (SQLite stores ``CURRENT_TIMESTAMP``'s UTC text)."""
    if isinstance(created, datetime):
        return created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{str(created).replace(' ', 'T')}Z" if created else ""
