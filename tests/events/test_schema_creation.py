"""Servers started at the same moment on an empty PostgreSQL schema: each creates the
schema and its tables (events, views, users) without tripping over the others."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest

from app.config import Settings
from app.events.store import EventStore
from app.projections.views import open_views
from app.storage.users import UserStore

pytestmark = pytest.mark.postgres
STARTS = 4
ROUNDS = 3


def start_like_a_server(settings: Settings) -> None:
    """What ``eventchat serve`` creates before it listens (blocking)."""
    store = EventStore.open(settings)
    try:
        views = open_views(settings)
        views.close()
        UserStore(settings).count()
    finally:
        store.close()


def start_at_once(settings: Settings) -> list[BaseException]:
    barrier = threading.Barrier(STARTS, timeout=30)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait()
            start_like_a_server(settings)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(STARTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a start did not finish"
    return errors


def test_concurrent_starts_on_an_empty_schema_never_fail(pg_url: str) -> None:
    for _ in range(ROUNDS):
        schema = f"t_{uuid.uuid4().hex[:16]}"  # not created: the starts create it
        settings = Settings(database_url=pg_url, database_schema=schema, store_threads=2)
        try:
            assert start_at_once(settings) == []
        finally:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
