"""The Stats object (the contract's shape, without ``live``) read from counters and sketches.

Counters are exact integers (durations in microseconds, tokens/s in thousandths, so sums do
not depend on the order events were batched in); distributions come from the log-bucketed
sketches of ``sketch`` (1 % relative error).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..storage.sql import Tx
from . import sketch
from .batch import SEP, model_scope

TOTALS = ("chats", "messages", "responses", "failed_responses", "prompt_tokens",
          "completion_tokens", "total_tokens", "tool_calls", "tool_errors")


def empty() -> dict[str, Any]:
    return build({}, {})


def read(tx: Tx, scope: str) -> dict[str, Any]:
    counters = {name: int(value) for name, value in
                tx.all("SELECT name, value FROM view_counters WHERE scope = ?", (scope,))}
    scopes = [scope] + [model_scope(scope, m) for m in _named(counters, "model")]
    marks = ", ".join("?" for _ in scopes)
    buckets: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for s, metric, bucket, count in tx.all(
        f"SELECT scope, metric, bucket, count FROM view_sketches WHERE scope IN ({marks})",
        scopes,
    ):
        buckets[(s, metric)].append((int(bucket), int(count)))
    return build(counters, {(s[len(scope):], m): b for (s, m), b in buckets.items()})


def _named(counters: dict[str, int], kind: str) -> dict[str, dict[str, int]]:
    """``{"<kind>\x1f<name>\x1f<field>": v}`` regrouped as ``{name: {field: v}}``."""
    grouped: dict[str, dict[str, int]] = defaultdict(dict)
    for key, value in counters.items():
        parts = key.split(SEP)
        if len(parts) == 3 and parts[0] == kind:
            grouped[parts[1]][parts[2]] = value
    return dict(grouped)


def build(
    counters: dict[str, int], buckets: dict[tuple[str, str], list[tuple[int, int]]]
) -> dict[str, Any]:
    """``buckets`` are keyed by (scope suffix: "" or "\x1fmodel\x1f<m>", metric)."""

    def dist(metric: str, suffix: str = "") -> list[float | None]:
        return sketch.quantiles(buckets.get((suffix, metric), []), (0.5, 0.95, 0.99))

    latency, ttft, tps = dist("latency_ms"), dist("ttft_ms"), dist("tokens_per_second")
    tps_count = counters.get("tps_count", 0)
    tools = {
        name: {
            "calls": c.get("calls", 0),
            "errors": c.get("errors", 0),
            "mean_duration_ms": c["duration_us"] / 1000 / c["timed"] if c.get("timed") else None,
        }
        for name, c in sorted(_named(counters, "tool").items())
    }
    models = {
        name: {
            "responses": c.get("responses", 0),
            "total_tokens": c.get("total_tokens", 0),
            "ttft_ms": {"p50": dist("ttft_ms", f"{SEP}model{SEP}{name}")[0]},
        }
        for name, c in sorted(_named(counters, "model").items())
    }
    return {
        "totals": {key: counters.get(key, 0) for key in TOTALS},
        "latency_ms": dict(zip(("p50", "p95", "p99"), latency, strict=True)),
        "ttft_ms": dict(zip(("p50", "p95", "p99"), ttft, strict=True)),
        "tokens_per_second": {
            "p50": tps[0],
            "mean": counters["tps_milli"] / 1000 / tps_count if tps_count else None,
        },
        "tools": tools,
        "models": models,
    }
