"""``eventchat bench keys``: what per-chat keys cost each event, in microseconds.

Maps a streamed batch of text (a ``TokensGenerated`` event of ``--chars`` characters) to
its stored form and back, ``--events`` times, through the library's mapper with no cipher,
with one global key (``EVENTCHAT_CIPHER_KEY`` before per-chat keys), and through
``ChatMapper`` with the chat's key cached (the common path); then the first event of new
chats, which makes and stores their keys (one insert each): SQLite in a temporary directory,
or with ``--database-url`` PostgreSQL in a schema of its own (dropped afterwards).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from uuid import uuid4

from eventsourcing.cipher import AESCipher
from eventsourcing.persistence import Mapper
from eventsourcing.utils import Environment

from ..config import Settings
from ..events.application import ChatApplication
from ..events.domain import ChatSession
from ..storage.recorder import persistence_env
from .processes import create_schema, drop_schema


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="eventchat bench keys", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000, help="events mapped (20000)")
    parser.add_argument("--chars", type=int, default=300, help="text per event (300)")
    parser.add_argument("--database-url", help="postgresql://...: keys stored there")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(data_dir=Path(data))
        if opts.database_url is None:
            print(json.dumps(measure(settings, opts.events, opts.chars), indent=2))
            return
        schema = f"bench_keys_{uuid4().hex[:8]}"
        settings = settings.replace(database_url=opts.database_url, database_schema=schema)
        create_schema(opts.database_url, schema)
        try:
            print(json.dumps(measure(settings, opts.events, opts.chars), indent=2))
        finally:
            drop_schema(opts.database_url, schema)


def measure(settings: Settings, events: int, chars: int) -> dict[str, float]:
    """Microseconds per event: ``<way>_encode_us`` and ``<way>_decode_us`` for ``plain``,
    ``global_key`` and ``chat_key``, and ``new_chat_key_us`` (the first event of a chat)."""
    app = ChatApplication(env=persistence_env(settings))
    try:
        chat = ChatSession.start("bench")
        chat.receive_message("question")
        chat.start_response("model", "offline")
        app.save(chat)
        assert chat.current is not None
        chat.record_tokens(chat.current.response_id, "x" * chars, 64)
        event = chat.collect_events()[-1]
        key = base64.b64encode(os.urandom(32)).decode()
        ways = {
            "plain": Mapper(app.mapper.transcoder),
            "global_key": Mapper(app.mapper.transcoder,
                                 cipher=AESCipher(Environment(env={"CIPHER_KEY": key}))),
            "chat_key": app.mapper,
        }
        figures: dict[str, float] = {}
        for name, mapper in ways.items():
            stored = mapper.to_stored_event(event)
            figures[f"{name}_encode_us"] = _per_call(partial(mapper.to_stored_event, event),
                                                     events)
            figures[f"{name}_decode_us"] = _per_call(partial(mapper.to_domain_event, stored),
                                                     events)
        starts = [ChatSession.start("bench").collect_events()[0] for _ in range(200)]
        started = time.perf_counter()
        for first in starts:
            app.mapper.to_stored_event(first)
        figures["new_chat_key_us"] = (time.perf_counter() - started) / len(starts) * 1e6
        figures["chars_per_event"] = chars
        return {k: round(v, 2) for k, v in figures.items()}
    finally:
        app.close()


def _per_call(call: Callable[[], object], times: int) -> float:
    best = float("inf")
    for _ in range(3):  # the best of three: the least disturbed by the other processes
        started = time.perf_counter()
        for _ in range(times):
            call()
        best = min(best, (time.perf_counter() - started) / times * 1e6)
    return best

