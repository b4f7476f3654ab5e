"""The options of ``eventchat bench``: parsed before anything heavy is imported, so that
``--help`` is quick and needs none of the bench's own dependencies."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PACED = ("bench-50x20ms", "bench-500x2ms", "bench-2000x0.25ms")
QUICK_PACED = ("bench-10x20ms", "bench-100x2ms")

DESCRIPTION = """\
Measures eventchat against a direct call to the same model server.

It starts, on loopback, an OpenAI-compatible model server (a process of its own)
and eventchat serve pointed at it. It sends the same chats straight to the model
server (the baseline) and through eventchat (WebSocket, then POST /generate
streamed), and measures time to first token, throughput, server CPU per chunk,
log writes per response and their rate during long answers, server memory per
idle WebSocket connection (with and without permessage-deflate) and the views.
It prints a table and writes every figure to --out; what it is doing goes to
stderr as it goes. See docs/performance.md.

A full run takes several minutes; --quick takes about a minute.
"""

EPILOG = """\
eventchat bench projections [--events N] [--messages N] [--reads N]
[--database-url URL] measures the views alone (eventchat bench projections --help).
"""

PROJECTIONS_DESCRIPTION = """\
Measures the views alone: writes a synthetic log (chats with streamed replies,
tool calls, some failures) to a fresh store, rebuilds every view from it, then
times reading a 100-message page of one long chat. SQLite in a temporary
directory, or PostgreSQL in a temporary schema with --database-url.
"""


@dataclass(frozen=True)
class Options:
    stores: tuple[str, ...]
    chats: int
    messages: int
    chunks: int
    idle_connections: int
    database_url: str
    paced_models: tuple[str, ...]
    projection_events: int
    projection_messages: int
    projection_reads: int
    #: Turns of the single-chat runs (TTFT with nothing else going on).
    single_chat_messages: int = 40
    #: Mean pause between two turns of a chat in the paced runs (0: no paced run).
    think_s: float = 1.0
    #: Directory for py-spy profiles of the server during the WebSocket load (None: none).
    profile: Path | None = None
    #: Seconds the idle-memory runs wait for the server's memory to settle, each time.
    settle_s: float = 2.0
    #: ``--store`` was left to its default (both stores).
    default_stores: bool = False


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventchat bench", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"],
                        help="the store(s) eventchat uses (default: both, sqlite first)")
    parser.add_argument("--chats", type=int, metavar="N", help="concurrent chats (50; quick: 5)")
    parser.add_argument("--messages", type=int, metavar="N",
                        help="measured turns per chat (20; quick: 3)")
    parser.add_argument("--chunks", type=int, default=25, metavar="N",
                        help="content chunks per answer (%(default)s)")
    parser.add_argument("--idle-connections", type=int, metavar="N",
                        help="idle WebSockets for the memory figures (5000; quick: 200)")
    parser.add_argument("--think-ms", type=float, metavar="MS",
                        help="mean pause between turns in the paced runs (1000; quick: 100)")
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    parser.add_argument("--settle-ms", type=float, default=2000, metavar="MS",
                        help="wait for the server's memory to settle, before and after the "
                             "idle connections open (%(default)g)")
    parser.add_argument("--database-url", metavar="URL",
                        help="PostgreSQL for --store postgres|both (EVENTCHAT_DATABASE_URL, "
                             f"else EVENTCHAT_TEST_DATABASE_URL, else {DEFAULT_PG_URL})")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"), metavar="FILE",
                        help="where every figure is written, as JSON (%(default)s)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy profiles of the server under load, in DIR (needs py-spy)")
    return parser


def projections_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventchat bench projections", description=PROJECTIONS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, metavar="N",
                        help="events in the synthetic log (%(default)s)")
    parser.add_argument("--messages", type=int, default=10_000, metavar="N",
                        help="messages of the long chat whose pages are read (%(default)s)")
    parser.add_argument("--reads", type=int, default=200, metavar="N",
                        help="page reads timed (%(default)s)")
    parser.add_argument("--database-url", metavar="URL",
                        help="run on PostgreSQL, in a temporary schema (default: SQLite)")
    return parser


def options(argv: list[str]) -> tuple[Options, Path]:
    args = parser().parse_args(argv)
    quick = args.quick
    url = (args.database_url or os.environ.get("EVENTCHAT_DATABASE_URL")
           or os.environ.get("EVENTCHAT_TEST_DATABASE_URL") or DEFAULT_PG_URL)
    store = args.store or "both"
    stores = ("sqlite", "postgres") if store == "both" else (store,)
    return Options(
        stores=stores,
        chats=args.chats or (5 if quick else 50),
        messages=args.messages or (3 if quick else 20),
        chunks=args.chunks,
        idle_connections=args.idle_connections or (200 if quick else 5000),
        database_url=url,
        paced_models=QUICK_PACED if quick else PACED,
        projection_events=2_000 if quick else 50_000,
        projection_messages=200 if quick else 2_000,
        projection_reads=10 if quick else 100,
        single_chat_messages=5 if quick else 40,
        think_s=args.think_ms / 1000 if args.think_ms is not None else (0.1 if quick else 1.0),
        profile=args.profile,
        default_stores=args.store is None,
        settle_s=args.settle_ms / 1000,
    ), args.out
