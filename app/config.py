"""One typed settings object, read once: flags, then environment, then the configuration
file, then defaults.

``Settings.from_env(environ)`` reads the variables of the wire contract (and the tuning knobs
below, all prefixed ``EVENTCHAT_``), over the TOML file that ``EVENTCHAT_CONFIG`` (or the
``config_file`` flag) names (``app.configfile``: models, MCP servers, tools that need
approval, budgets); tests build ``Settings(...)`` directly and never touch ``os.environ``. A
malformed value raises ``SettingsError`` naming the variable or the file's key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .configfile import OFFLINE, Budget, Budgets, McpServer, SettingsError, Upstream, read_config

__all__ = ["Budget", "Budgets", "McpServer", "ProviderName", "Settings", "SettingsError",
           "Upstream"]

#: Which model provider serves the chats (``app.llm.base.Provider`` is the interface).
ProviderName = Literal["openai", "offline"]
#: The model an ``openai`` upstream is asked for when nothing names one.
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"
#: Settings only the configuration file gives (no environment variable).
FILE_ONLY = {"config_file", "upstreams", "mcp_servers", "budgets"}


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("./data")
    database_url: str | None = None
    #: PostgreSQL schema for every table (tests use one schema each).
    database_schema: str = "public"
    host: str = "127.0.0.1"
    port: int = 8000

    provider: ProviderName = "offline"
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    model: str | None = None
    #: Seconds to wait for the upstream to answer, and between two streamed chunks.
    request_timeout_s: float = 60.0
    #: Retries of a refused request (429, 5xx, connection error) before the first token.
    max_retries: int = 2
    #: Seconds between two offline tokens (0 streams as fast as possible).
    offline_token_delay_s: float = 0.01
    #: Longest wait for a model call's first streamed token, retries and their pauses
    #: included (keep-alive comments do not count as a token).
    model_first_token_timeout_s: float = 120.0
    #: Longest a whole model call (one round of a response) may take, first byte to last.
    model_deadline_s: float = 600.0
    #: Most tokens a model may generate in one call, sent upstream as ``max_tokens`` (a
    #: chat's own ``max_tokens`` wins); unset: the server's own limit.
    max_tokens: int | None = None

    allowed_origins: tuple[str, ...] = ()

    #: A reply's streamed text is committed (and only then shown) at most this often (ms);
    #: its first text at once. 60 ms keeps a streaming response within 17 transactions in
    #: any second, and its text on the screen within one interval of the model's.
    token_flush_ms: float = 60.0
    #: An actor with nothing to do stops after this many seconds and comes back from the log.
    passivate_after_s: float = 300.0
    #: Several processes on PostgreSQL: how often each looks for chats a dead process left.
    recovery_interval_s: float = 30.0
    #: Several processes on PostgreSQL: how often the connection holding the chat leases is
    #: checked (a lost connection means lost leases: those chats stop being written here).
    lease_check_interval_s: float = 1.0
    #: Longest a request waits on a store that does not answer before a 503.
    store_timeout_s: float = 5.0
    #: The views are updated this long (ms) after a save, so that a burst of saves makes one
    #: batch; a reader waiting for them (read-your-writes) has them updated at once.
    projection_delay_ms: float = 20.0
    mailbox_size: int = 64
    subscriber_queue_size: int = 1024
    snapshot_interval: int = 200
    #: Worker threads that may touch the store at once (matched to the PostgreSQL pool).
    store_threads: int = 10
    #: Conversation messages sent to the model as context, most recent last.
    context_messages: int = 50
    tool_timeout_s: float = 10.0
    max_tool_rounds: int = 4

    #: A WebSocket with no frame either way for this long is closed (1001); clients resume
    #: with ``subscribe`` and ``after_seq``. Pings keep proxies from closing quieter ones.
    ws_idle_timeout_s: float = 600.0
    #: Seconds between WebSocket pings, which keep quiet connections open through proxies
    #: that close silent ones (0: none; each idle connection then costs about 3 KiB less).
    ws_ping_interval_s: float = 20.0
    max_message_chars: int = 32_000
    max_frame_bytes: int = 64 * 1024
    messages_per_minute: int = 30
    concurrent_responses: int = 2
    #: Chats a user may create per hour (sliding window).
    chats_per_hour: int = 200
    #: WebSocket connections a user may hold open at once (per process).
    ws_connections_per_user: int = 32
    #: Chats one WebSocket connection may follow at once.
    follows_per_connection: int = 64
    #: Seconds of silence after which an SSE follow (``GET /chat/{id}/stream``) sends a
    #: ``: keep-alive`` comment, so that proxies do not close it.
    sse_keepalive_s: float = 15.0

    #: Bearer token that ``/metrics`` asks for (scrapers only; user tokens are refused).
    metrics_token: str | None = None
    #: ``host:port`` of a listener of its own that serves ``/metrics`` without a token (bind
    #: it to an address only the scraper can reach).
    metrics_bind: str | None = None
    #: Model names metrics may carry as label values, beside ``model`` and the offline
    #: model; any other name is counted as ``other``.
    metrics_models: tuple[str, ...] = ()
    #: ``/health`` reports ``degraded`` (503) when the views are this many events behind
    #: the log, or have not advanced for ``projection_stall_s`` while behind.
    projection_max_lag: int = 10_000
    projection_stall_s: float = 30.0

    #: Optional at-rest encryption (AES-GCM, base64 key) and zlib compression of events.
    cipher_key: str | None = None
    compress: bool = False
    #: The secret that signs audit checkpoints (HMAC-SHA256; ``eventchat audit checkpoint``).
    audit_key: str | None = None

    #: OpenTelemetry's standard variable: traces of the turns go to this OTLP/HTTP
    #: collector (``<endpoint>/v1/traces``); unset, nothing of OpenTelemetry is loaded.
    otel_exporter_otlp_endpoint: str | None = None
    #: Puts message content (messages, replies, tool arguments and results) in the spans.
    otel_content: bool = False

    #: The configuration file read (``--config``, ``EVENTCHAT_CONFIG``), if any.
    config_file: Path | None = None
    #: The model servers of the configuration file; none: the one upstream of ``provider``,
    #: ``openai_base_url`` and ``models`` (``catalog()``).
    upstreams: tuple[Upstream, ...] = ()
    #: More model ids the ``provider`` upstream serves, beside ``model`` (no file).
    models: tuple[str, ...] = ()
    #: MCP servers whose tools are offered to the model.
    mcp_servers: tuple[McpServer, ...] = ()
    #: Tools whose calls wait for a person's approval.
    approval_tools: tuple[str, ...] = ()
    #: A call waiting for approval with no decision after this many seconds is denied
    #: (``timeout``), counted from its request, across restarts.
    tool_approval_timeout_s: float = 300.0
    #: Per-user daily token budgets (none by default).
    budgets: Budgets = field(default_factory=Budgets)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Builds settings from ``environ`` (default ``os.environ``); ``overrides`` (flags) win.

        Overrides whose value is ``None`` are ignored, so unset CLI flags fall through.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config = overrides.get("config_file") or env.get("EVENTCHAT_CONFIG") or None
        if config is not None:
            values.update(read_config(Path(config), env), config_file=Path(config))
        for f in dataclasses.fields(cls):
            if f.name in FILE_ONLY:
                continue
            raw = env.get(_env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        if "provider" not in values:
            upstream = values.get("openai_base_url") or values.get("openai_api_key")
            values["provider"] = "openai" if upstream else "offline"
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.provider not in ("openai", "offline"):
            raise SettingsError(
                f"EVENTCHAT_PROVIDER must be openai or offline, not {self.provider!r}"
            )
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise SettingsError("EVENTCHAT_DATABASE_URL must be a postgresql:// URL")
        if self.token_flush_ms <= 0:
            raise SettingsError("EVENTCHAT_TOKEN_FLUSH_MS must be positive")
        for name in ("chats_per_hour", "ws_connections_per_user", "follows_per_connection",
                     "projection_max_lag"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env_name(name)} must be positive")
        if self.projection_delay_ms < 0 or self.ws_ping_interval_s < 0:
            raise SettingsError(
                "EVENTCHAT_PROJECTION_DELAY_MS and EVENTCHAT_WS_PING_INTERVAL_S cannot be negative"
            )
        if self.upstreams and self.model is not None and self.model not in self.model_ids():
            raise SettingsError(f"the default model {self.model!r} (EVENTCHAT_MODEL or"
                                " default_model) is not one of the configured models")

    def catalog(self) -> tuple[Upstream, ...]:
        """The model servers and their model ids: the configuration file's, or else the one
        upstream that ``provider`` names (``openai`` at ``openai_base_url``, or offline)."""
        if self.upstreams:
            return self.upstreams
        if self.provider == "offline":
            return (Upstream(OFFLINE, "offline", _unique((OFFLINE, *self.models))),)
        default = self.model or OPENAI_DEFAULT_MODEL
        return (Upstream("openai", "openai", _unique((default, *self.models)),
                         self.openai_base_url, "OPENAI_API_KEY", self.openai_api_key),)

    def model_ids(self) -> tuple[str, ...]:
        return tuple(m for upstream in self.catalog() for m in upstream.models)

    @property
    def default_model(self) -> str:
        """The model of a chat that names none: ``model`` when it is listed (the offline
        upstream serves ``offline`` only), else the first one listed."""
        ids = self.model_ids()
        return self.model if self.model in ids else ids[0]

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def store_kind(self) -> Literal["sqlite", "postgres"]:
        return "postgres" if self.database_url else "sqlite"


_UNPREFIXED = {"openai_base_url", "openai_api_key", "otel_exporter_otlp_endpoint"}


def _unique(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _env_name(name: str) -> str:
    return name.upper() if name in _UNPREFIXED else f"EVENTCHAT_{name.upper()}"


def _parse(name: str, annotation: Any, raw: str) -> Any:
    kind = str(annotation)
    try:
        if "tuple" in kind:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind.startswith("bool"):
            return raw.strip().lower() in ("1", "true", "yes", "y", "on")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if "Path" in kind:
            return Path(raw)
    except ValueError as exc:
        raise SettingsError(f"{_env_name(name)}={raw!r} is not a valid {kind}") from exc
    return raw
