"""Per-chat data keys on both stores: the events as stored, old stores, wrapping, shredding."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

import pytest
from eventsourcing.cipher import AESCipher as GlobalCipher
from eventsourcing.utils import Environment

from app.config import Settings
from app.events.application import ChatApplication
from app.events.domain import ChatSession
from app.events.errors import ChatDeletedError, StoreUnavailableError
from app.events.keys import ChatMapper, chat_cipher
from app.storage.recorder import persistence_env

SECRET = "a line nobody else may read"


@contextmanager
def opened(settings: Settings) -> Iterator[ChatApplication]:
    app = ChatApplication(env=persistence_env(settings))
    try:
        yield app
    finally:
        app.close()


def stored(app: ChatApplication, chat_id: UUID) -> list[tuple[str, bytes]]:
    """(event class, state as stored) of the chat's events."""
    return [(n.topic.rsplit(".", 1)[-1], n.state)
            for n in app.recorder.select_notifications(1, 1000) if n.originator_id == chat_id]


def written_before_keys(app: ChatApplication) -> ChatSession:
    """A chat as the version before per-chat keys wrote it (the library's mapper)."""
    mapper = app.mapper
    assert isinstance(mapper, ChatMapper)
    keys, mapper.keys = mapper.keys, None
    try:
        chat = ChatSession.start("alice", "old")
        chat.receive_message(SECRET)
        app.save(chat)
    finally:
        mapper.keys = keys
    return chat


def test_each_chat_has_its_own_key_and_a_deleted_chat_is_unreadable(settings: Settings) -> None:
    with opened(settings) as app:
        one, two = ChatSession.start("alice", "one"), ChatSession.start("alice", "two")
        for chat in (one, two):
            chat.receive_message(SECRET)
            app.save(chat)
        states = stored(app, one.id) + stored(app, two.id)
        assert all(SECRET.encode() not in state and b"alice" not in state for _, state in states)
        key_one, key_two = (app.keys.table.read(c.id) for c in (one, two))
        assert key_one is not None and key_two is not None and key_one.key != key_two.key
        assert not key_one.wrapped
        # the library's AES-GCM with that chat's key reads its events, and only its
        assert key_one.key is not None
        assert SECRET.encode() in chat_cipher(key_one.key).decrypt(stored(app, one.id)[1][1])
        with pytest.raises(ValueError):
            chat_cipher(key_one.key).decrypt(stored(app, two.id)[1][1])

        chat = app.get_chat(one.id)
        chat.delete("alice")
        app.save(chat)
        app.destroy_key(one.id)
        assert app.keys.table.read(one.id) == type(key_one)(None, False)
        with pytest.raises(ChatDeletedError):
            app.get_chat(one.id)
        assert app.get_chat(two.id).history[0]["content"] == SECRET
        deleted = [n for n in app.recorder.select_notifications(1, 100)
                   if n.originator_id == one.id][-1]
        event = app.mapper.to_domain_event(deleted)  # who deleted it stays readable
        assert isinstance(event, ChatSession.Deleted) and event.deleted_by == "alice"
        with pytest.raises(ChatDeletedError):
            chat.receive_message("again")
    with opened(settings) as app:  # another process: its cache knew nothing
        with pytest.raises(ChatDeletedError):
            app.get_chat(one.id)


def test_a_store_written_before_per_chat_keys_still_reads(settings: Settings) -> None:
    master = base64.b64encode(os.urandom(32)).decode()
    settings = settings.replace(cipher_key=master)
    old_cipher = GlobalCipher(Environment(env={"CIPHER_KEY": master}))
    with opened(settings) as app:
        old = written_before_keys(app)
    with opened(settings) as app:  # the new version opens it
        chat = app.get_chat(old.id)
        assert chat.history[0]["content"] == SECRET and app.keys.table.read(old.id) is None
        chat.receive_message("a new message of an old chat")
        app.save(chat)
        # an old chat's new events keep the old form: the global key reads them
        assert b"a new message" in old_cipher.decrypt(stored(app, old.id)[-1][1])
        new = ChatSession.start("alice", "new")
        app.save(new)
        row = app.keys.table.read(new.id)
        assert row is not None and row.wrapped and row.key is not None
        with pytest.raises(ValueError):
            old_cipher.decrypt(stored(app, new.id)[0][1])  # its own key, not the global one
        # deleting an old chat: 404 from then on (its events keep the old form: see the docs)
        chat = app.get_chat(old.id)
        chat.delete("alice")
        app.save(chat)
        app.destroy_key(old.id)
        with pytest.raises(ChatDeletedError):
            app.get_chat(old.id)
    # the wrapped keys need the key that wrapped them: a store never opens half readable
    for wrong in (None, base64.b64encode(os.urandom(32)).decode()):
        with pytest.raises(StoreUnavailableError, match="EVENTCHAT_CIPHER_KEY"):
            ChatApplication(env=persistence_env(settings.replace(cipher_key=wrong)))
