"""Stats: totals, tools, models, and percentiles within the sketch's relative error."""

from __future__ import annotations

import math
import random

from app.events.domain import ChatSession
from app.events.store import EventStore
from app.projections import Views, ViewUpdater, sketch

from .conftest import save_and_wait, timing, usage


def exact(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def assert_close(estimate: float | None, truth: float) -> None:
    assert estimate is not None
    assert abs(estimate - truth) <= sketch.ALPHA * truth + 1e-9, (estimate, truth)


def test_sketch_quantiles_within_relative_error() -> None:
    rng = random.Random(3)
    samples = [rng.lognormvariate(5, 1.5) for _ in range(20_000)] + [0.0] * 50
    counts: dict[int, int] = {}
    for value in samples:
        bucket = sketch.bucket_of(value)
        counts[bucket] = counts.get(bucket, 0) + 1
    assert len(counts) < 2000  # bounded by the range, not by the number of samples
    qs = (0.0, 0.01, 0.5, 0.95, 0.99, 1.0)
    for q, estimate in zip(qs, sketch.quantiles(counts.items(), qs), strict=True):
        assert_close(estimate, exact(samples, q))
    assert sketch.quantiles([], (0.5,)) == [None]


async def test_stats_scopes_and_percentiles(
    store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    rng = random.Random(11)
    owners = {"alice": [ChatSession.start(owner="alice") for _ in range(3)],
              "bob": [ChatSession.start(owner="bob")]}
    samples: dict[str, list[tuple[str, float, float, float]]] = {"alice": [], "bob": []}
    for owner, chats in owners.items():
        for i in range(120):
            chat = chats[i % len(chats)]
            model = "m-a" if i % 3 else "m-b"
            chat.receive_message(f"q{i}")
            rid = chat.start_response(model, "offline")
            chat.record_tokens(rid, "x", 1)
            t = timing(rng.uniform(5, 500), rng.lognormvariate(6, 1), rng.uniform(1, 100))
            if i % 10 == 0:
                chat.fail_response(rid, {"code": "e", "message": "m"}, usage(), t)
            else:
                chat.complete_response(rid, model, "stop", usage(), t)
            samples[owner].append((model, t["ttft_ms"], t["duration_ms"], t["tokens_per_second"]))
    await save_and_wait(store, views, *owners["alice"], *owners["bob"])

    overall = await views.stats()
    assert set(overall) == {"totals", "latency_ms", "ttft_ms", "tokens_per_second", "tools",
                            "models"}
    assert overall["totals"] == {
        "chats": 4, "messages": 480, "responses": 240, "failed_responses": 24,
        "prompt_tokens": 2400, "completion_tokens": 1200, "total_tokens": 3600,
        "tool_calls": 0, "tool_errors": 0,
    }
    everything = samples["alice"] + samples["bob"]
    for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        assert_close(overall["latency_ms"][key], exact([s[2] for s in everything], q))
        assert_close(overall["ttft_ms"][key], exact([s[1] for s in everything], q))
    assert_close(overall["tokens_per_second"]["p50"], exact([s[3] for s in everything], 0.5))
    mean = sum(s[3] for s in everything) / len(everything)
    assert abs(overall["tokens_per_second"]["mean"] - mean) < 1e-3
    assert set(overall["models"]) == {"m-a", "m-b"}
    assert overall["models"]["m-b"]["responses"] == 80
    assert overall["models"]["m-b"]["total_tokens"] == 80 * 15
    assert_close(overall["models"]["m-b"]["ttft_ms"]["p50"],
                 exact([s[1] for s in everything if s[0] == "m-b"], 0.5))

    bob = await views.stats(owner="bob")
    assert bob["totals"]["responses"] == 120 and bob["totals"]["chats"] == 1
    assert_close(bob["latency_ms"]["p95"], exact([s[2] for s in samples["bob"]], 0.95))
    one = await views.stats(owner="alice", chat_id=owners["alice"][0].id)
    assert one["totals"]["responses"] == 40 and one["totals"]["chats"] == 1
    hidden = await views.stats(owner="bob", chat_id=owners["alice"][0].id)
    assert hidden["totals"]["responses"] == 0 and hidden["latency_ms"]["p50"] is None
