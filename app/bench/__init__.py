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
table and writes every figure to ``--out``; says what it is doing on stderr as it goes. See
docs/performance.md.

The options are parsed (``app.bench.options``) before the modules that measure are imported:
``--help`` needs none of them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .options import Options, options, projections_parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the table, writes the JSON file; returns the results."""
    opts, out = options(list(sys.argv[1:] if argv is None else argv))
    from .figures import add_ratios, table
    from .processes import BenchError
    from .progress import say
    from .run import machine, run
    from .upstream import raise_open_files_limit

    raise_open_files_limit()
    say(_plan(opts))
    try:
        if "postgres" in opts.stores:
            check_postgres(opts.database_url)
        results = {"machine": machine(), "options": _public(opts), **run(opts)}
    except BenchError as exc:
        sys.exit(f"eventchat bench: {exc}")
    add_ratios(results)
    out.write_text(json.dumps(results, indent=2) + "\n")
    say(f"done; every figure in {out}")
    print(table(results))
    print(f"\nevery figure: {out}")
    return results


def projections_main(argv: list[str]) -> None:
    """``eventchat bench projections``: the views alone (``app.projections.bench``)."""
    projections_parser().parse_args(argv)
    from ..projections.bench import main as projections_bench

    projections_bench(argv)


def _plan(opts: Options) -> str:
    stores = " and ".join(opts.stores)
    why = " (the default: --store sqlite or --store postgres runs one)" if (
        opts.default_stores) else ""
    where = f"; PostgreSQL at {_database(opts.database_url)}" if "postgres" in opts.stores else ""
    return (f"stores: {stores}{why}{where}; {opts.chats} chats x {opts.messages} turns, "
            f"{opts.chunks} chunks an answer, {opts.idle_connections} idle connections")


def check_postgres(url: str) -> None:
    import psycopg

    from .processes import BenchError, admin_connection

    try:
        admin_connection(url, timeout_s=3.0).close()
    except psycopg.OperationalError as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise BenchError(f"PostgreSQL is not reachable at {_database(url)} ({reason}); use "
                         "--store sqlite, or --database-url") from exc


def _database(url: str) -> str:
    return url.split("@")[-1]


def _public(opts: Options) -> dict[str, Any]:
    values = {f: getattr(opts, f) for f in opts.__dataclass_fields__}
    url = values.pop("database_url")
    values["profile"] = str(opts.profile) if opts.profile else None
    values["database"] = _database(url) if "postgres" in opts.stores else None
    return values
