"""Chats written through the real event store, and tampering with the stored rows directly
(as someone with access to the database would), on either store."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg

from app.config import Settings
from app.events.application import ChatApplication
from app.events.domain import ChatSession
from app.storage.chain import link
from app.storage.recorder import CHAIN_TABLE, SQLITE_CHAIN_TABLE, persistence_env

#: Events of a chat from ``two_turn_chat``.
EVENTS = 9


def open_app(settings: Settings) -> ChatApplication:
    return ChatApplication(env=persistence_env(settings))


def two_turn_chat(app: ChatApplication, owner: str = "alice", words: str = "sums") -> UUID:
    """A chat of ``EVENTS`` events, saved as the actors save them (a few at a time)."""
    chat = ChatSession.start(owner, words)
    for n, text in enumerate((f"what is 12*7 ({words})", "and 6*7?")):
        chat.receive_message(text, f"c-{n}")
        app.save(chat)
        rid = chat.start_response("offline", "offline")
        chat.record_tokens(rid, f"answer {n}", 2)
        app.save(chat)
        chat.complete_response(rid, "offline", "stop", {"total_tokens": 2}, {"ttft_ms": 1.0})
        app.save(chat)
    assert chat.version == EVENTS
    return chat.id


class Tamper:
    """Direct SQL on the event store's tables (the library's events table and the chain)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.postgres = settings.database_url is not None
        if self.postgres:
            schema = settings.database_schema
            self.events, self.chain = f'"{schema}".eventchat_events', f'"{schema}".{CHAIN_TABLE}'
        else:
            self.events, self.chain = "stored_events", SQLITE_CHAIN_TABLE

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        if self.postgres:
            assert self.settings.database_url is not None
            with psycopg.connect(self.settings.database_url) as conn, conn.cursor() as curs:
                yield curs
        else:
            conn = sqlite3.connect(self.settings.data_dir / "events.sqlite")
            try:
                with conn:
                    yield conn.cursor()
            finally:
                conn.close()

    def _run(self, statement: str, params: tuple[object, ...] = ()) -> list[Any]:
        statement = statement.format(events=self.events, chain=self.chain)
        if self.postgres:
            statement = statement.replace("?", "%s")
        with self._cursor() as curs:
            curs.execute(statement, params)
            return list(curs.fetchall()) if curs.description else []

    def _id(self, chat_id: UUID) -> object:
        return chat_id if self.postgres else chat_id.hex

    def state(self, chat_id: UUID, seq: int) -> tuple[str, bytes]:
        rows = self._run("SELECT topic, state FROM {events} WHERE originator_id = ? AND "
                         "originator_version = ?", (self._id(chat_id), seq))
        return str(rows[0][0]), bytes(rows[0][1])

    def change_byte(self, chat_id: UUID, seq: int) -> None:
        """Flips one bit in the middle of the event's stored state."""
        _, state = self.state(chat_id, seq)
        changed = bytearray(state)
        changed[len(changed) // 2] ^= 0x01
        self._run("UPDATE {events} SET state = ? WHERE originator_id = ? AND "
                  "originator_version = ?", (bytes(changed), self._id(chat_id), seq))

    def delete_event(self, chat_id: UUID, seq: int) -> None:
        self._run("DELETE FROM {events} WHERE originator_id = ? AND originator_version = ?",
                  (self._id(chat_id), seq))

    def swap(self, chat_id: UUID, a: int, b: int) -> None:
        """Exchanges the places of two events in the chat's log."""
        key = self._id(chat_id)
        for old, new in ((a, -1), (b, a), (-1, b)):
            self._run("UPDATE {events} SET originator_version = ? WHERE originator_id = ? AND "
                      "originator_version = ?", (new, key, old))

    def cut_events(self, chat_id: UUID, from_seq: int) -> None:
        """Deletes the events from ``from_seq`` on (their links stay)."""
        self._run("DELETE FROM {events} WHERE originator_id = ? AND originator_version >= ?",
                  (self._id(chat_id), from_seq))

    def cut_chain(self, chat_id: UUID, from_seq: int) -> None:
        self._run("DELETE FROM {chain} WHERE chat_id = ? AND version >= ?",
                  (self._id(chat_id), from_seq))

    def drop_chain(self) -> None:
        """The store as a version without the chain left it."""
        self._run("DROP TABLE {chain}")
        self._run("DROP TABLE IF EXISTS {chain}_state")

    def rewrite_last(self, chat_id: UUID, seq: int) -> None:
        """Changes event ``seq`` (the last one) and writes a link that fits it: the chain
        holds, and only a checkpoint can tell."""
        self.change_byte(chat_id, seq)
        topic, state = self.state(chat_id, seq)
        rows = self._run("SELECT hash FROM {chain} WHERE chat_id = ? AND version = ?",
                         (self._id(chat_id), seq - 1))
        digest = link(bytes(rows[0][0]), chat_id, seq, topic, state)
        self._run("UPDATE {chain} SET hash = ? WHERE chat_id = ? AND version = ?",
                  (digest, self._id(chat_id), seq))

    def links(self) -> list[tuple[str, int, bytes]]:
        return [(str(r[0]), int(r[1]), bytes(r[2]))
                for r in self._run("SELECT chat_id, version, hash FROM {chain} "
                                   "ORDER BY chat_id, version")]


def tampered_store(settings: Settings) -> dict[str, UUID]:
    """Five chats, four of them tampered with one way each: ``intact``, ``modified``
    (a bit of event 2), ``missing`` (event 3 deleted), ``reordered`` (events 4 and 5
    swapped), ``truncated`` (the second turn, events 6 to 9, cut and their links kept: the
    chat ends on a finished turn, so that a server starting on it has nothing to record)."""
    app = open_app(settings)
    try:
        chats = {name: two_turn_chat(app, words=name) for name in
                 ("intact", "modified", "missing", "reordered", "truncated")}
    finally:
        app.close()
    tamper = Tamper(settings)
    tamper.change_byte(chats["modified"], 2)
    tamper.delete_event(chats["missing"], 3)
    tamper.swap(chats["reordered"], 4, 5)
    tamper.cut_events(chats["truncated"], 6)
    return chats


#: What ``audit verify`` and ``/audit`` must say of each chat of ``tampered_store``.
EXPECTED = {"modified": (2, "modified"), "missing": (3, "missing"),
            "reordered": (4, "reordered"), "truncated": (6, "truncated")}
