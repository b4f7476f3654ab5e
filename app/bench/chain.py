"""The audit chain's cost per event (docs/performance.md, "The audit chain").

    python -m app.bench.chain [--events 600] [--rounds 5] [--batch 3] [--database-url URL]

Two figures: the link alone (SHA-256 over the canonical form, for stored states of a few
sizes), and a save with the chain against the same save without it. The saves go through
the real recorders, in batches of ``--batch`` events of one chat, as an actor saves a turn's
events. They run on SQLite (a temporary data dir) and on PostgreSQL (a temporary schema,
dropped afterwards) when it is reachable. "Without" is the same recorder with its link
step skipped, so the difference is the chain's own work; the two alternate for ``--rounds``
rounds and the medians are shown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from ..config import Settings
from ..events.application import ChatApplication
from ..events.domain import ChatSession
from ..storage.chain import GENESIS, link
from ..storage.recorder import persistence_env

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def link_us(size: int, count: int = 20_000) -> float:
    """Microseconds per link of a stored state of ``size`` bytes."""
    chat_id, state, previous = uuid.uuid4(), bytes(size), GENESIS
    started = time.perf_counter()
    for version in range(1, count + 1):
        previous = link(previous, chat_id, version, "app.events.domain:ChatSession.X", state)
    return (time.perf_counter() - started) / count * 1e6


def save_us(settings: Settings, events: int, batch: int, chained: bool) -> float:
    """Microseconds per event of saving ``events`` events, ``batch`` per save, a chat of
    100 events after another."""
    app = ChatApplication(env=persistence_env(settings))
    recorder: Any = app.recorder
    if not chained:
        recorder.chain.link_inserted = lambda curs, stored_events: None
    try:
        elapsed, saved = 0.0, 0
        while saved < events:
            chat = ChatSession.start("bench", "chain")
            app.save(chat)
            for n in range(100 // batch):
                for k in range(batch):
                    chat.receive_message(f"message {n}.{k} " + "x" * 200, f"m-{n}-{k}")
                started = time.perf_counter()
                app.save(chat)
                elapsed += time.perf_counter() - started
                saved += batch
        return elapsed / saved * 1e6
    finally:
        app.close()


@contextmanager
def store(kind: str, url: str) -> Iterator[Settings | None]:
    """Settings for a fresh store of ``kind`` (None: PostgreSQL is not reachable at ``url``)."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield Settings(data_dir=Path(tmp) / "data")
        return
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.OperationalError:
        yield None
        return
    schema = f"bench_chain_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield Settings(database_url=url, database_schema=schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.bench.chain", description=__doc__)
    parser.add_argument("--events", type=int, default=600, help="events per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    args = parser.parse_args(argv)
    for size in (200, 2000, 20000):
        print(f"link of a {size:>5}-byte state: {link_us(size):6.2f} us")
    for kind in ("sqlite", "postgres"):
        with store(kind, args.database_url) as settings:
            if settings is None:
                print(f"{kind}: not reachable at {args.database_url}")
                continue
            save_us(settings, args.batch * 30, args.batch, True)  # warm up
            runs: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):  # alternated, so that a busy machine hits both alike
                for chained in (False, True):
                    runs[chained].append(save_us(settings, args.events, args.batch, chained))
            without, with_chain = statistics.median(runs[False]), statistics.median(runs[True])
            print(f"{kind}: saves of {args.batch} events, median of {args.rounds} rounds: "
                  f"{without:7.1f} us/event without the chain, {with_chain:7.1f} with it "
                  f"({with_chain - without:+.1f} us, {(with_chain / without - 1) * 100:+.0f} %)")

if __name__ == "__main__":
    main()
