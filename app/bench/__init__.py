"""``eventchat bench``: eventchat against a direct call to the same model server.

    eventchat bench [--store sqlite|postgres|both] [--chats 50] [--messages 20] [--chunks 25]
                    [--idle-connections 5000] [--quick] [--database-url URL]
                    [--out bench-results.json]

Starts, on loopback, an OpenAI-compatible upstream (``app.bench.upstream``, its own process)
and ``eventchat serve`` pointed at it; sends the same chats straight to the upstream with the
``openai`` client (the baseline) and through eventchat (WebSocket, then ``POST /generate``
streamed); measures time to first token, throughput, server CPU per chunk, log writes per
response and their rate during long answers, server memory per idle WebSocket connection
(with and without permessage-deflate) and the views (``app.projections.bench``). Prints a
table and writes every figure to ``--out``. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import psycopg

from .figures import add_ratios, table
from .processes import BenchError
from .run import Options, machine, run
from .upstream import raise_open_files_limit

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PACED = ("bench-50x20ms", "bench-500x2ms", "bench-2000x0.25ms")
QUICK_PACED = ("bench-10x20ms", "bench-100x2ms")


def options(argv: list[str]) -> tuple[Options, Path]:
    parser = argparse.ArgumentParser(prog="eventchat bench", description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--chats", type=int, help="concurrent chats (50; quick: 5)")
    parser.add_argument("--messages", type=int, help="measured turns per chat (20; quick: 3)")
    parser.add_argument("--chunks", type=int, default=25, help="content chunks per answer")
    parser.add_argument("--idle-connections", type=int, help="idle WebSockets (5000; quick: 200)")
    parser.add_argument("--think-ms", type=float,
                        help="mean pause between turns in the paced runs (1000; quick: 100)")
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    parser.add_argument("--database-url", help="PostgreSQL for --store postgres|both")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy profiles of the server under load, in DIR (needs py-spy)")
    args = parser.parse_args(argv)
    quick = args.quick
    url = (args.database_url or os.environ.get("EVENTCHAT_DATABASE_URL")
           or os.environ.get("EVENTCHAT_TEST_DATABASE_URL") or DEFAULT_PG_URL)
    stores = ("sqlite", "postgres") if args.store == "both" else (args.store,)
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
    ), args.out


def check_postgres(url: str) -> None:
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        raise BenchError(f"PostgreSQL is not reachable ({exc}); use --store sqlite") from exc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the table, writes the JSON file; returns the results."""
    opts, out = options(list(sys.argv[1:] if argv is None else argv))
    raise_open_files_limit()
    try:
        if "postgres" in opts.stores:
            check_postgres(opts.database_url)
        results = {"machine": machine(), "options": _public(opts), **run(opts)}
    except BenchError as exc:
        sys.exit(f"eventchat bench: {exc}")
    add_ratios(results)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nevery figure: {out}")
    return results


def _public(opts: Options) -> dict[str, Any]:
    values = dict(vars(opts)) if hasattr(opts, "__dict__") else {
        f: getattr(opts, f) for f in opts.__dataclass_fields__}
    url = values.pop("database_url")
    values["profile"] = str(opts.profile) if opts.profile else None
    values["database"] = url.split("@")[-1] if "postgres" in opts.stores else None
    return values
