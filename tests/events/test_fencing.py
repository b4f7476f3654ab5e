"""Fenced saves on PostgreSQL: a chat's events are written only under its lease's epoch."""

from __future__ import annotations

from uuid import UUID

import psycopg
import pytest
import trio

from app.config import Settings
from app.events.application import LEASES_TABLE, Fence
from app.events.domain import ChatSession
from app.events.errors import FencedError
from app.events.store import EventStore


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def set_epoch(settings: Settings, chat_id: UUID, epoch: int) -> None:
    """What a process taking the chat's lease does to its row."""
    assert settings.database_url
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{settings.database_schema}".{LEASES_TABLE} VALUES (%s, %s, %s) '
            "ON CONFLICT (chat_id) DO UPDATE SET epoch = EXCLUDED.epoch",
            (chat_id, "test", epoch),
        )


async def test_a_save_is_written_only_under_the_leases_current_epoch(settings: Settings) -> None:
    store = await trio.to_thread.run_sync(EventStore.open, settings)
    chat = ChatSession.start("alice", "fenced")
    await store.save(chat)
    chat.receive_message("no lease row yet", None)
    with pytest.raises(FencedError):
        await store.save(chat, fence=Fence(chat.id, 1))

    chat = await store.get(chat.id)
    await trio.to_thread.run_sync(set_epoch, settings, chat.id, 1)
    chat.receive_message("under epoch 1", None)
    await store.save(chat, fence=Fence(chat.id, 1))

    await trio.to_thread.run_sync(set_epoch, settings, chat.id, 2)  # another process took it
    chat.receive_message("too late", None)
    with pytest.raises(FencedError) as fenced:
        await store.save(chat, fence=Fence(chat.id, 1))
    assert fenced.value.code == "owner_lost"
    stored = await store.get(chat.id)
    assert [m["content"] for m in stored.history] == ["under epoch 1"]
    assert stored.version == 2
    store.close()


async def test_a_take_waits_for_a_save_past_its_fence_check(settings: Settings) -> None:
    """The check share-locks the lease row until the save commits: a new owner's epoch bump
    cannot slip in between the check and the commit."""
    store = await trio.to_thread.run_sync(EventStore.open, settings)
    chat = ChatSession.start("alice", "fenced")
    await store.save(chat)
    await trio.to_thread.run_sync(set_epoch, settings, chat.id, 1)
    assert settings.database_url
    table = f'"{settings.database_schema}".{LEASES_TABLE}'
    with psycopg.connect(settings.database_url) as saving, psycopg.connect(
        settings.database_url, autocommit=True
    ) as taking:
        saving.execute(f"SELECT epoch FROM {table} WHERE chat_id = %s FOR SHARE", (chat.id,))
        taking.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            taking.execute(f"UPDATE {table} SET epoch = epoch + 1 WHERE chat_id = %s", (chat.id,))
        saving.rollback()
        taking.execute(f"UPDATE {table} SET epoch = epoch + 1 WHERE chat_id = %s", (chat.id,))
    store.close()
