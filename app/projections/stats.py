"""The Stats object (the contract's shape, without ``live``) read from counters and sketches.

Counters are exact integers (durations in microseconds, tokens/s in thousandths, so sums do
not depend on the order events were batched in); distributions come from the log-bucketed
sketches of ``sketch`` (1 % relative error).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TypedDict

from ..storage.sql import Tx
from . import sketch
from .batch import SEP, model_scope


class Percentiles(TypedDict):
    p50: float | None
    p95: float | None
    p99: float | None


class TokenRate(TypedDict):
    p50: float | None
    mean: float | None


class ToolStats(TypedDict):
    calls: int
    errors: int
    mean_duration_ms: float | None


class ModelStats(TypedDict):
    responses: int
    total_tokens: int
    ttft_ms: dict[str, float | None]


class Stats(TypedDict):
    """The contract's Stats, without ``live``."""

    totals: dict[str, int]
    latency_ms: Percentiles
    ttft_ms: Percentiles
    tokens_per_second: TokenRate
    tools: dict[str, ToolStats]
    models: dict[str, ModelStats]


TOTALS = ("chats", "messages", "responses", "failed_responses", "prompt_tokens",
          "completion_tokens", "total_tokens", "tool_calls", "tool_errors")


def empty() -> Stats:
    return build({}, {})


def read(tx: Tx, scope: str) -> Stats:
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
) -> Stats:
    """``buckets`` are keyed by (scope suffix: "" or "\x1fmodel\x1f<m>", metric)."""

    def dist(metric: str, suffix: str = "") -> list[float | None]:
        return sketch.quantiles(buckets.get((suffix, metric), []), (0.5, 0.95, 0.99))

    latency, ttft, tps = dist("latency_ms"), dist("ttft_ms"), dist("tokens_per_second")
    tps_count = counters.get("tps_count", 0)
    tools = {
        name: ToolStats(
            calls=c.get("calls", 0),
            errors=c.get("errors", 0),
            mean_duration_ms=c["duration_us"] / 1000 / c["timed"] if c.get("timed") else None,
        )
        for name, c in sorted(_named(counters, "tool").items())
    }
    models = {
        name: ModelStats(
            responses=c.get("responses", 0),
            total_tokens=c.get("total_tokens", 0),
            ttft_ms={"p50": dist("ttft_ms", f"{SEP}model{SEP}{name}")[0]},
        )
        for name, c in sorted(_named(counters, "model").items())
    }
    return {
        "totals": {key: counters.get(key, 0) for key in TOTALS},
        "latency_ms": _percentiles(latency),
        "ttft_ms": _percentiles(ttft),
        "tokens_per_second": {
            "p50": tps[0],
            "mean": counters["tps_milli"] / 1000 / tps_count if tps_count else None,
        },
        "tools": tools,
        "models": models,
    }


def _percentiles(values: list[float | None]) -> Percentiles:
    p50, p95, p99 = values
    return Percentiles(p50=p50, p95=p95, p99=p99)
