"""Fixtures shared by the whole suite: settings on each store.

Every test that takes ``settings`` runs twice, once on SQLite files in a temporary data dir
and once on PostgreSQL in a schema of its own (dropped afterwards). PostgreSQL is found at
``EVENTCHAT_TEST_DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``); when
it cannot be reached the PostgreSQL runs are skipped with the reason, unless
``EVENTCHAT_REQUIRE_POSTGRES=1`` (set by CI), where they fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from app.config import Settings

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_url() -> str:
    url = os.environ.get("EVENTCHAT_TEST_DATABASE_URL", DEFAULT_PG_URL)
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL not reachable at {url}: {exc}".strip()
        if os.environ.get("EVENTCHAT_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return url


@pytest.fixture
def pg_schema(pg_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped with everything in it after the test."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield schema
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def base_settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        offline_token_delay_s=0.0,
        token_flush_ms=20.0,
        passivate_after_s=300.0,
        store_threads=4,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for one test on ``store_kind``: SQLite in ``tmp_path`` or a fresh PG schema."""
    s = base_settings(tmp_path / "data")
    if store_kind == "postgres":
        url = request.getfixturevalue("pg_url")
        schema = request.getfixturevalue("pg_schema")
        s = s.replace(database_url=url, database_schema=schema)
    return s
