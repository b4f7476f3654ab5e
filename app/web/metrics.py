"""Prometheus metrics, in a registry of the app's own (never the process-global one).

Model metrics carry the OpenTelemetry GenAI names (``gen_ai_client_token_usage``,
``gen_ai_client_operation_duration_seconds``, ``gen_ai_server_time_to_first_token_seconds``,
``gen_ai_server_time_per_output_token_seconds``). They are observed from the event log as
the views updater projects it (``ResponseObserver``), so a response counts whether or
not anyone watched it, and with several processes sharing one database each response is
counted by exactly one of them (sum the series over processes). Gauges (connections, active
chats, mailbox depth, projection lag) are read at scrape time.

``gen_ai_response_model`` only takes the model names the operator configured (``Metrics``'s
``models``: ``EVENTCHAT_MODEL``, the provider's default model and ``EVENTCHAT_METRICS_MODELS``);
any other name, such as a free-text ``model`` a user gave a chat, is counted as ``other``, so
users can neither read each other's names nor grow the series without bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_asgi_app,
)

from ..events.domain import ChatSession, ending_status
from ..projections.tracking import Events

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE", "Metrics", "ResponseObserver"]

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# the bucket boundaries advised by the OpenTelemetry GenAI semantic conventions
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
MODEL_LABELS = ("gen_ai_operation_name", "gen_ai_response_model")
#: The ``gen_ai_response_model`` of every model name that was not configured.
OTHER_MODEL = "other"



class Metrics:
    """The app's registry and metrics; ``models`` are the names model labels may carry."""

    def __init__(self, models: Iterable[str | None] = ()) -> None:
        self.models = frozenset(name for name in models if name)
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

    def observe_ending(self, status: str, data: dict[str, Any], model: str) -> None:
        self.responses.labels(status).inc()
        usage = data.get("usage") or {}
        timing = data.get("timing") or {}
        labels = ("chat", self.model_label(data.get("model"), model))
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

    def model_label(self, *names: str | None) -> str:
        """The first of ``names`` (answering model, then requested) that was configured."""
        return next((name for name in names if name in self.models), OTHER_MODEL)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def asgi_app(self) -> ASGIFramework:
        """An ASGI app serving the registry on every path, for a listener of its own.

        prometheus_client's app serves HTTP only: a WebSocket handshake is refused, and the
        lifespan Hypercorn opens is acknowledged (there is nothing to start or stop).
        """
        serve_http = make_asgi_app(self.registry)

        async def app(scope: Scope, receive: ASGIReceiveCallable,
                      send: ASGISendCallable) -> None:
            if scope["type"] == "http":
                await serve_http(scope, receive, send)
            elif scope["type"] == "websocket":
                # no code: the server picks its default for a refused handshake
                await send(cast(ASGISendEvent, {"type": "websocket.close"}))
            else:
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})

        return app


class ResponseObserver:
    """Observes each ended response among the events the views updater projected.

    Called in the updater's worker thread (one batch at a time); Prometheus metrics are
    thread-safe.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._models: dict[str, str] = {}

    def __call__(self, events: Events) -> None:
        for event in events:
            if isinstance(event, ChatSession.ResponseStarted):
                self._models[event.response_id] = event.model
            elif isinstance(event, ChatSession.ResponseEnded):
                model = self._models.pop(event.response_id, "")
                self.metrics.observe_ending(ending_status(event), dict(event.__dict__), model)
