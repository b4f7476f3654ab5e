"""Prometheus metrics, in a registry of the app's own (never the process-global one).

Model metrics carry the OpenTelemetry GenAI names (``gen_ai_client_token_usage``,
``gen_ai_client_operation_duration_seconds``, ``gen_ai_server_time_to_first_token_seconds``,
``gen_ai_server_time_per_output_token_seconds``). They are observed from the event log by
``MetricsFollower``, so a response counts whether or not anyone watched it; when several
processes share one database each one counts the whole shared log. Gauges (connections,
active chats, mailbox depth, projection lag) are read at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..events.domain import TERMINAL_STATUS
from ..events.errors import StoreError
from ..events.store import EventStore

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE", "Metrics", "MetricsFollower"]

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# the bucket boundaries advised by the OpenTelemetry GenAI semantic conventions
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
MODEL_LABELS = ("gen_ai_operation_name", "gen_ai_response_model")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Tokens used per response, by token type",
            (*MODEL_LABELS, "gen_ai_token_type"), buckets=TOKEN_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "Duration of a response",
            (*MODEL_LABELS, "error_type"), buckets=DURATION_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Time to the first streamed token",
            MODEL_LABELS, buckets=TTFT_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds", "Time per output token after the first",
            MODEL_LABELS, buckets=TPOT_BUCKETS, registry=r,
        )
        self.responses = Counter(
            "eventchat_responses", "Responses ended, by status", ("status",), registry=r
        )
        self.ws_frames = Counter(
            "eventchat_websocket_frames_received", "Frames received from clients", registry=r
        )
        self.http_requests = Counter(
            "eventchat_http_requests", "HTTP requests answered, by status", ("status",), registry=r
        )

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read by ``read`` at scrape time (errors read as 0)."""

        def safe() -> float:
            try:
                return float(read())
            except Exception:  # noqa: BLE001 - a scrape must never fail on one gauge
                return 0.0

        Gauge(name, doc, registry=self.registry).set_function(safe)

    def observe_ending(self, kind: str, data: dict[str, Any], model: str) -> None:
        status = TERMINAL_STATUS.get(kind, "unknown")
        self.responses.labels(status).inc()
        usage = data.get("usage") or {}
        timing = data.get("timing") or {}
        labels = ("chat", data.get("model") or model or "unknown")
        for token_type, key in (("input", "prompt_tokens"), ("output", "completion_tokens")):
            if isinstance(usage.get(key), int | float):
                self.token_usage.labels(*labels, token_type).observe(usage[key])
        duration = timing.get("duration_ms")
        if isinstance(duration, int | float):
            error_type = "" if status == "complete" else status
            if status == "failed":
                error_type = str((data.get("error") or {}).get("code", "failed"))
            self.duration.labels(*labels, error_type).observe(duration / 1000)
        ttft = timing.get("ttft_ms")
        if isinstance(ttft, int | float):
            self.ttft.labels(*labels).observe(ttft / 1000)
            completion = usage.get("completion_tokens")
            if isinstance(duration, int | float) and isinstance(completion, int) and completion > 1:
                self.tpot.labels(*labels).observe((duration - ttft) / 1000 / (completion - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsFollower:
    """Follows the event log from where it stood at start and observes each ended response.

    Nudged after every local save; polls every ``poll_s`` for other processes' writes. Store
    errors are logged and retried at the next poll; cancellation stops it.
    """

    def __init__(self, store: EventStore, metrics: Metrics, poll_s: float = 1.0) -> None:
        self.store = store
        self.metrics = metrics
        self.poll_s = poll_s
        self._nudge = trio.Event()
        self._models: dict[str, str] = {}

    def nudge(self, _position: int = 0) -> None:
        self._nudge.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        position = await self.store.max_position()
        self.store.on_saved.append(self.nudge)
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.poll_s):
                    await self._nudge.wait()
                self._nudge = trio.Event()
                try:
                    position = await self.store.run(self._catch_up, position)
                except StoreError as exc:
                    log.warning("metrics: cannot read the event log: %s", exc)
        finally:
            if self.nudge in self.store.on_saved:
                self.store.on_saved.remove(self.nudge)

    def _catch_up(self, position: int) -> int:
        """Blocking: observes the events after ``position``; returns the new position."""
        app = self.store.app
        while True:
            batch = app.select(position + 1, 500)
            for notification in batch:
                topic = notification.topic
                if topic.endswith(("ResponseStarted", *TERMINAL_STATUS)):
                    self._observe(app.mapper.to_domain_event(notification))
            if not batch:
                return position
            position = batch[-1].id

    def _observe(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "ResponseStarted":
            self._models[event.response_id] = event.model
            return
        model = self._models.pop(event.response_id, "")
        self.metrics.observe_ending(kind, dict(event.__dict__), model)
