"""Benchmark of the views: rebuild throughput and message-page latency.

    python -m app.projections.bench [--events N] [--messages M] [--database-url URL]

Writes a synthetic log (chats with user messages, streamed responses in token batches, tool
calls, some failures) to a fresh store, rebuilds every view from it, then times reading a
100-message page of a chat holding ``messages`` messages. Without ``--database-url`` it runs
on SQLite in a temporary directory; with one, in a temporary PostgreSQL schema dropped after.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio
from psycopg import sql

from ..config import Settings
from ..events.application import ChatApplication
from ..events.domain import ChatSession
from ..storage.postgres import connect
from ..storage.recorder import persistence_env
from .admin import rebuild
from .views import open_views

OWNER = "bench"
SAVE_EVENTS = 5000


def _turn(chat: ChatSession, rng: random.Random, n: int) -> int:
    """Records one turn; returns the number of events it added."""
    before = len(chat.pending_events)
    chat.receive_message(f"question {n}: what about {rng.choice(WORDS)} and {rng.choice(WORDS)}?")
    rid = chat.start_response("bench-model", "offline")
    if rng.random() < 0.1:
        chat.invoke_tool(rid, f"call-{n}", "calculator", {"expression": "12*7"})
        chat.complete_tool(rid, f"call-{n}", 84, rng.uniform(0.1, 2.0))
    for _ in range(rng.randint(2, 5)):
        chat.record_tokens(rid, " ".join(rng.choices(WORDS, k=8)) + " ", 8)
    usage = {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}
    timing = {"ttft_ms": rng.uniform(20, 400), "duration_ms": rng.uniform(200, 4000),
              "tokens_per_second": rng.uniform(10, 90)}
    if rng.random() < 0.03:
        chat.fail_response(rid, {"code": "upstream_error", "message": "x"}, usage, timing)
    else:
        chat.complete_response(rid, "bench-model", "stop", usage, timing)
    return len(chat.pending_events) - before


WORDS = ("event", "sourcing", "trio", "actor", "stream", "token", "chat", "search", "view",
         "projection", "latency", "rebuild", "postgres", "sqlite", "model", "tool")


def write_log(settings: Settings, events: int, messages: int, seed: int = 7) -> str:
    """Writes at least ``events`` events; returns the id of the chat with ``messages``."""
    rng = random.Random(seed)
    app = ChatApplication(env=persistence_env(settings), snapshot_interval=10**9)
    try:
        big = ChatSession.start(owner=OWNER, title="the long chat")
        written = pending = 1
        n = 0
        while big.message_count < messages:
            n += 1
            added = _turn(big, rng, n)
            written, pending = written + added, pending + added
            if pending >= SAVE_EVENTS:
                app.save(big)
                pending = 0
        app.save(big)
        while written < events:
            chats = [ChatSession.start(owner=f"user{rng.randrange(50)}", title=f"chat {i}")
                     for i in range(50)]
            written += len(chats)
            for chat in chats:
                for _ in range(rng.randint(1, 25)):
                    n += 1
                    written += _turn(chat, rng, n)
            app.save(*chats)
        return str(big.id)
    finally:
        app.close()


def read_pages(settings: Settings, chat_id: str, messages: int, reads: int) -> list[float]:
    """Times ``reads`` reads of a 100-message page at random places; seconds each."""
    views = open_views(settings)
    rng = random.Random(1)

    async def main() -> list[float]:
        latest, _ = await views.messages(OWNER, chat_id, limit=1)
        last_seq = latest[-1]["seq"]
        timings = []
        for _ in range(reads):
            before = rng.randint(last_seq // 2, last_seq + 1)
            start = time.perf_counter()
            page, _ = await views.messages(OWNER, chat_id, limit=100, before_seq=before)
            timings.append(time.perf_counter() - start)
            assert len(page) == 100
        return timings

    try:
        return trio.run(main)
    finally:
        views.close()


def run_bench(settings: Settings, events: int = 200_000, messages: int = 10_000,
              reads: int = 200) -> dict[str, Any]:
    started = time.perf_counter()
    chat_id = write_log(settings, events, messages)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    processed = rebuild(settings, progress=False)
    rebuild_s = time.perf_counter() - started
    timings = sorted(read_pages(settings, chat_id, messages, reads))
    return {
        "store": settings.store_kind,
        "events": processed,
        "write_s": round(write_s, 2),
        "rebuild_s": round(rebuild_s, 2),
        "rebuild_events_per_s": round(processed / rebuild_s),
        "page_reads": reads,
        "page_median_ms": round(statistics.median(timings) * 1000, 2),
        "page_p95_ms": round(timings[int(0.95 * (len(timings) - 1))] * 1000, 2),
    }


def _schema(settings: Settings, statement: str) -> None:
    """Runs ``statement`` on the bench's schema (its name in the braces)."""
    with connect(settings.replace(store_timeout_s=60.0), "bench") as conn:
        conn.execute(sql.SQL(statement).format(sql.Identifier(settings.database_schema)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--database-url")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), store_threads=4)
        schema = None
        if args.database_url:
            schema = f"bench_{uuid.uuid4().hex[:12]}"
            settings = settings.replace(database_url=args.database_url, database_schema=schema)
            _schema(settings, "CREATE SCHEMA {}")
        try:
            result = run_bench(settings, args.events, args.messages, args.reads)
        finally:
            if schema is not None:
                _schema(settings, "DROP SCHEMA {} CASCADE")
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
