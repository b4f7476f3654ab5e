"""From raw measurements to figures: percentiles, rates, ratios to the baseline, and the table."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from .clients import LoadResult
from .idle import IdleResult


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def ttft_figures(seconds: list[float]) -> dict[str, float | None]:
    return {"p50": _ms(percentile(seconds, 50)), "p99": _ms(percentile(seconds, 99))}


def load_figures(load: LoadResult, server_cpu_s: float | None) -> dict[str, Any]:
    wall = max(load.wall_s, 1e-9)
    figures: dict[str, Any] = {
        "chats": load.chats, "messages_per_chat": load.messages,
        "turns_requested": load.chats * load.messages, "turns_completed": load.turns,
        "turns_wrong": load.wrong, "errors": load.errors,
        "chunks_per_turn": load.chunks_per_turn, "delta_frames": load.frames,
        "chunks_received": load.chunks, "wall_s": round(wall, 3),
        "turns_per_s": round(load.turns / wall, 1), "chunks_per_s": round(load.chunks / wall),
        "ttft_ms": ttft_figures(load.ttft_s),
    }
    if server_cpu_s is not None:
        figures["server_cpu_s"] = round(server_cpu_s, 2)
        figures["server_cpu_share"] = round(server_cpu_s / wall, 2)
        figures["server_cpu_us_per_chunk"] = round(server_cpu_s / max(1, load.chunks) * 1e6, 1)
    return figures


def log_figures(counts: dict[str, int], measured_turns: int, write_transactions: float | None,
                commits: float | None) -> dict[str, Any]:
    """Events per response from the log; on PostgreSQL, transactions per measured turn."""
    responses = max(1, counts.get("ResponseStarted", 0))
    figures: dict[str, Any] = {
        "responses": counts.get("ResponseStarted", 0),
        "events_per_response": {k: round(v / responses, 2) for k, v in sorted(counts.items())},
    }
    if write_transactions is not None and commits is not None:
        turns = max(1, measured_turns)
        figures["event_write_transactions_per_turn"] = round(write_transactions / turns, 2)
        figures["database_commits_per_turn"] = round(commits / turns, 2)
    return figures


def write_rate_figures(model: str, chunks: int, ok: bool, events: list[dict[str, Any]],
                       write_transactions: int | None) -> dict[str, Any]:
    """How often one long streamed answer was written to the log."""
    started = next(e for e in events if e["type"] == "ResponseStarted")
    ended = next(e for e in events if e["type"].startswith("Response")
                 and e["type"] != "ResponseStarted")
    batches = [e for e in events if e["type"] == "TokensGenerated"]
    # the last batch is written with the ending, in one transaction, when the stream ends
    periodic = [_time(e) for e in batches if e["seq"] != ended["seq"] - 1]
    duration = max(_time(ended) - _time(started), 1e-9)
    gaps = [b - a for a, b in zip(periodic, periodic[1:], strict=False)]
    figures: dict[str, Any] = {
        "model": model, "chunks": chunks, "complete": ok, "duration_s": round(duration, 3),
        "tokens_per_s": round(chunks / duration), "token_batches": len(batches),
        "token_batches_per_s": round(len(batches) / duration, 1),
        "periodic_flushes": len(periodic),
        "min_periodic_flush_gap_ms": round(min(gaps) * 1000, 1) if gaps else None,
    }
    if write_transactions is not None:
        figures["write_transactions"] = write_transactions
        figures["write_transactions_per_s"] = round(write_transactions / duration, 1)
    return figures


def _time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def idle_figures(idle: IdleResult) -> dict[str, Any]:
    return {
        "connections": idle.connections, "server_counted": idle.server_count,
        "permessage_deflate_offered": idle.deflate, "extensions_negotiated": idle.negotiated,
        "one_frame_each_way_first": idle.exchange,
        "server_rss_before_mib": round(idle.rss_before / 2**20, 1),
        "server_rss_after_mib": round(idle.rss_after / 2**20, 1),
        "kib_per_connection": round(idle.per_connection / 1024, 1),
    }


def add_ratios(results: dict[str, Any]) -> None:
    """Adds, to every eventchat load, its TTFT added over the baseline and its ratios."""
    base = results["baseline"]
    for store in results["stores"].values():
        for name in ("websocket", "sse"):
            load = store[name]
            added = {q: _minus(load["ttft_ms"][q], base["ttft_ms"][q]) for q in ("p50", "p99")}
            load["added_ttft_ms"] = added
            for run in ("one_chat", "paced"):
                if run in load:
                    one, base_one = load[run], base[run]
                    one["added_ttft_ms"] = {q: _minus(one["ttft_ms"][q], base_one["ttft_ms"][q])
                                            for q in ("p50", "p99")}
            load["vs_baseline"] = {
                "ttft_p50": _ratio(load["ttft_ms"]["p50"], base["ttft_ms"]["p50"]),
                "ttft_p99": _ratio(load["ttft_ms"]["p99"], base["ttft_ms"]["p99"]),
                "turns_per_s": _ratio(load["turns_per_s"], base["turns_per_s"]),
                "chunks_per_s": _ratio(load["chunks_per_s"], base["chunks_per_s"]),
                "cpu_per_chunk": _ratio(load.get("server_cpu_us_per_chunk"),
                                        base.get("client_cpu_us_per_chunk")),
            }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def table(results: dict[str, Any]) -> str:
    """A plain-text table of the headline figures, one column per measurement."""
    base = results["baseline"]
    chats = results.get("options", {}).get("chats", base["chats"])
    columns: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [("baseline", base, None)]
    for name, store in results["stores"].items():
        columns += [(f"{name} ws", store["websocket"], store), (f"{name} sse", store["sse"], None)]
    rows: list[tuple[str, list[Any]]] = [
        ("turns completed / requested",
         [f"{c['turns_completed']}/{c['turns_requested']}" for _, c, _ in columns]),
        ("chunks received", [c["chunks_received"] for _, c, _ in columns]),
        ("text frames received", [c["delta_frames"] for _, c, _ in columns]),
        ("TTFT p50 ms", [c["ttft_ms"]["p50"] for _, c, _ in columns]),
        ("TTFT p99 ms", [c["ttft_ms"]["p99"] for _, c, _ in columns]),
        ("added TTFT p50 ms", [c.get("added_ttft_ms", {}).get("p50", "-") for _, c, _ in columns]),
        ("added TTFT p99 ms", [c.get("added_ttft_ms", {}).get("p99", "-") for _, c, _ in columns]),
        (f"paced {chats} chats: TTFT p50 ms",
         [c["paced"]["ttft_ms"]["p50"] if "paced" in c else "-" for _, c, _ in columns]),
        ("paced: added TTFT p50 ms",
         [c["paced"].get("added_ttft_ms", {}).get("p50", "-") if "paced" in c else "-"
          for _, c, _ in columns]),
        ("paced: added TTFT p99 ms",
         [c["paced"].get("added_ttft_ms", {}).get("p99", "-") if "paced" in c else "-"
          for _, c, _ in columns]),
        ("paced: model TTFT in server p50 ms",
         [c["paced"]["model_ttft_ms"]["p50"] if "model_ttft_ms" in c.get("paced", {}) else "-"
          for _, c, _ in columns]),
        ("one chat alone: TTFT p50 ms",
         [c["one_chat"]["ttft_ms"]["p50"] if "one_chat" in c else "-" for _, c, _ in columns]),
        ("one chat alone: added TTFT p50 ms",
         [c["one_chat"].get("added_ttft_ms", {}).get("p50", "-") if "one_chat" in c else "-"
          for _, c, _ in columns]),
        ("one chat alone: added TTFT p99 ms",
         [c["one_chat"].get("added_ttft_ms", {}).get("p99", "-") if "one_chat" in c else "-"
          for _, c, _ in columns]),
        ("turns/s", [c["turns_per_s"] for _, c, _ in columns]),
        ("  x baseline", [c.get("vs_baseline", {}).get("turns_per_s", "-") for _, c, _ in columns]),
        ("chunks/s", [c["chunks_per_s"] for _, c, _ in columns]),
        ("CPU us/chunk (server; base: client)",
         [c.get("server_cpu_us_per_chunk", c.get("client_cpu_us_per_chunk"))
          for _, c, _ in columns]),
        ("server CPU share", [c.get("server_cpu_share", "-") for _, c, _ in columns]),
        ("log events / response",
         [_events_per_response(s) for _, _, s in columns]),
        ("event write txns / turn (PG)",
         [s["log"].get("event_write_transactions_per_turn", "-") if s else "-"
          for _, _, s in columns]),
        ("all DB commits / turn (PG)",
         [s["log"].get("database_commits_per_turn", "-") if s else "-" for _, _, s in columns]),
        ("idle KiB/conn (base: bare framework)",
         [s["idle"]["kib_per_connection"] if s else c.get("idle_floor", {}).get(
             "kib_per_connection", "-") for _, c, s in columns]),
        ("idle KiB/conn, no pings",
         [s["idle_no_pings"]["kib_per_connection"] if s else "-" for _, _, s in columns]),
        ("idle KiB/conn, deflate",
         [s["idle_deflate"]["kib_per_connection"] if s else "-" for _, _, s in columns]),
        ("idle KiB/conn after 1 frame each way",
         [s["idle_after_frame"]["kib_per_connection"] if s else "-" for _, _, s in columns]),
        ("  same, deflate",
         [s["idle_deflate_after_frame"]["kib_per_connection"] if s else "-"
          for _, _, s in columns]),
        ("max token batches/s (write-rate runs)",
         [max((w["token_batches_per_s"] for w in s["write_rate"]), default="-") if s else "-"
          for _, _, s in columns]),
        ("projection rebuild events/s",
         [s["projections"]["rebuild_events_per_s"] if s else "-" for _, _, s in columns]),
        ("history page p50 ms",
         [s["projections"]["page_median_ms"] if s else "-" for _, _, s in columns]),
    ]
    head = ["figure", *[name for name, _, _ in columns]]
    cells = [head, *[[label, *map(_cell, values)] for label, values in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _events_per_response(store: dict[str, Any] | None) -> str:
    if not store:
        return "-"
    per = store["log"]["events_per_response"]
    return str(round(sum(v for k, v in per.items() if k != "Started"), 2))


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
