"""Per-chat data keys: every chat's events (and snapshots) encrypted with a key of its own.

Envelope encryption, with the ``eventsourcing`` library's hooks and ``cryptography``:

- each chat gets a random 256-bit data key when its first event is stored; its events and
  snapshots are encrypted with it by the library's own AES-GCM cipher
  (``eventsourcing.cryptography.AESCipher``, over ``cryptography``), one per chat;
- the data key is stored in the keys table (``app.storage.keys``), wrapped with
  ``EVENTCHAT_CIPHER_KEY`` (RFC 3394 AES key wrap) when one is set, as is otherwise;
- deleting a chat destroys its data key: its events stay, as ciphertext that nothing can
  read, so the audit chain over them still verifies (crypto-shredding).

``ChatMapper`` is the application's ``Mapper``: it picks, per event, the library mapper of
the event's chat. Keys are cached in memory (``ChatKeys``), so an event costs no query once
its chat's key is known.

What stays in the old form (no data key of its own): the chats written before per-chat keys
(no row in the keys table), including their new events, which keep the form of their
first ones (the global ``EVENTCHAT_CIPHER_KEY`` cipher if set, else plain); and every
``ChatSession.Deleted`` event, so that who deleted a chat and when stays readable.
"""

from __future__ import annotations

import os
import threading
from base64 import b64decode, b64encode
from collections import OrderedDict
from uuid import UUID

from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)
from eventsourcing.cryptography import AESCipher
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import Environment

from ..storage.keys import KeyRow, KeyTable
from .domain import ChatSession
from .errors import ChatDeletedError, StoreUnavailableError

#: Bytes of a chat's data key (AES-256).
KEY_BYTES = 32
#: Chats whose key (or lack of one) is kept in memory, most recently used.
CACHE_SIZE = 10_000
DELETED_TOPIC = f"{ChatSession.Deleted.__module__}:{ChatSession.Deleted.__qualname__}"


class _Legacy:
    """The cached state of a chat written before per-chat keys."""


class _Destroyed:
    """The cached state of a deleted chat."""


LEGACY, DESTROYED = _Legacy(), _Destroyed()
State = AESCipher | _Legacy | _Destroyed


class ChatKeys:
    """The chats' data keys: made, unwrapped, cached and destroyed (blocking, thread-safe)."""

    def __init__(self, table: KeyTable, master_key: str | None = None,
                 cache_size: int = CACHE_SIZE) -> None:
        self.table = table
        self.master = b64decode(master_key) if master_key else None
        self.cache_size = cache_size
        self._cache: OrderedDict[UUID, State] = OrderedDict()
        self._lock = threading.Lock()

    def open(self) -> None:
        """Creates the table if needed and checks that the master key (or its absence)
        fits the keys stored: a store is never half readable because of a wrong setting."""
        self.table.create()
        row = self.table.first_wrapped()
        if row is not None and row.key is not None:
            self._cipher(row)

    def for_writing(self, chat_id: UUID, version: int) -> AESCipher | None:
        """The cipher of a chat's new event; None: the old form (a chat written before
        per-chat keys). A chat's first event makes its key."""
        state = self._state(chat_id)
        if state is None:
            row = self.table.read(chat_id)
            if row is None and version == 1:
                row = self._make(chat_id)
            state = self._remember(chat_id, row)
        if isinstance(state, _Destroyed):
            raise ChatDeletedError("chat not found")
        return state if isinstance(state, AESCipher) else None

    def for_reading(self, chat_id: UUID) -> AESCipher | None:
        """The cipher of a chat's stored events; None: the old form. Raises
        ``ChatDeletedError`` when the chat's key was destroyed."""
        state = self._state(chat_id)
        if state is None:
            state = self._remember(chat_id, self.table.read(chat_id))
        if isinstance(state, _Destroyed):
            raise ChatDeletedError("chat not found")
        return state if isinstance(state, AESCipher) else None

    def destroy(self, chat_id: UUID) -> None:
        """Destroys the chat's key, here and in the table: its events can no longer be read."""
        self.table.destroy(chat_id)
        with self._lock:
            self._cache[chat_id] = DESTROYED

    def forget(self, chat_id: UUID) -> None:
        """Drops what this process knows of the chat's key (another process may have
        destroyed it): the next event of the chat reads the table."""
        with self._lock:
            self._cache.pop(chat_id, None)

    def _state(self, chat_id: UUID) -> State | None:
        with self._lock:
            state = self._cache.get(chat_id)
            if state is not None:
                self._cache.move_to_end(chat_id)
            return state

    def _remember(self, chat_id: UUID, row: KeyRow | None) -> State:
        if row is None:
            state: State = LEGACY
        elif row.key is None:
            state = DESTROYED
        else:
            state = self._cipher(row)
        with self._lock:
            self._cache[chat_id] = state
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return state

    def _make(self, chat_id: UUID) -> KeyRow:
        key = os.urandom(KEY_BYTES)
        if self.master is not None:
            return self.table.insert(chat_id, aes_key_wrap(self.master, key), wrapped=True)
        return self.table.insert(chat_id, key, wrapped=False)

    def _cipher(self, row: KeyRow) -> AESCipher:
        assert row.key is not None
        key = row.key
        if row.wrapped:
            if self.master is None:
                raise StoreUnavailableError(
                    "the chats' keys are wrapped: set EVENTCHAT_CIPHER_KEY to read them")
            try:
                key = aes_key_unwrap(self.master, key)
            except InvalidUnwrap:
                raise StoreUnavailableError(
                    "EVENTCHAT_CIPHER_KEY is not the key that wrapped the chats' keys"
                ) from None
        return chat_cipher(key)


class ChatMapper(Mapper[UUID]):
    """The application's mapper: each chat's events through the library's mapper with that
    chat's cipher (see the module docstring). Until ``keys`` is set (the keys table is
    opened after the recorder), or for the old form, it is the library's mapper with the
    global cipher (``EVENTCHAT_CIPHER_KEY``) or none."""

    keys: ChatKeys | None = None

    def to_stored_event(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        cipher = None
        if self.keys is not None and not isinstance(domain_event, ChatSession.Deleted):
            cipher = self.keys.for_writing(
                domain_event.originator_id, domain_event.originator_version
            )
        if cipher is None:
            return super().to_stored_event(domain_event)
        return Mapper[UUID](self.transcoder, self.compressor, cipher).to_stored_event(
            domain_event)

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[UUID]:
        cipher = None
        chat_id = stored_event.originator_id
        assert isinstance(chat_id, UUID)
        if self.keys is not None:
            if stored_event.topic == DELETED_TOPIC:
                self.keys.forget(chat_id)  # deleted, perhaps by another process
            else:
                cipher = self.keys.for_reading(chat_id)
        if cipher is None:
            return super().to_domain_event(stored_event)
        return Mapper[UUID](self.transcoder, self.compressor, cipher).to_domain_event(
            stored_event)


def chat_cipher(key: bytes) -> AESCipher:
    """The library's AES-GCM cipher (over ``cryptography``) with ``key``."""
    return AESCipher(Environment(env={AESCipher.CIPHER_KEY: b64encode(key).decode("ascii")}))
