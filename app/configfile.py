"""The configuration file (TOML): models, MCP servers, tools that need approval, budgets.

``read_config(path, environ)`` reads the file with the standard library's ``tomllib`` and
returns the ``Settings`` values it names; ``Settings.from_env`` puts them under the
environment and the flags. Every value is checked here: a bad one raises ``ConfigError``
whose one line names the key (``config error: models.local.base_url: expected a string``),
and the command stops with it. The format, with a full example, is in
docs/configuration.md.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

#: The name of the built-in offline model, and of the upstream that serves it.
OFFLINE = "offline"


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


class ConfigError(SettingsError):
    """The configuration file cannot be used; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}" if key else f"config error: {problem}")
        self.key = key


@dataclass(frozen=True, slots=True)
class Upstream:
    """A model server and the model ids it serves: OpenAI-compatible, or the offline one."""

    name: str
    kind: Literal["openai", "offline"]
    models: tuple[str, ...]
    base_url: str | None = None
    #: The environment variable holding the key (its value is ``api_key``).
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class McpServer:
    """An MCP server: a process started with ``command`` (stdio), or a Streamable HTTP
    ``url``; exactly one of the two."""

    name: str
    command: tuple[str, ...] = ()
    url: str | None = None
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Budget:
    """Tokens a user may use per UTC day: every model together, and per model."""

    daily_tokens: int | None = None
    models: tuple[tuple[str, int], ...] = ()

    def for_model(self, model: str) -> int | None:
        return dict(self.models).get(model)

    @property
    def limited(self) -> bool:
        return self.daily_tokens is not None or bool(self.models)


@dataclass(frozen=True, slots=True)
class Budgets:
    """Each user's ``default`` budget, and the users that have one of their own."""

    default: Budget = Budget()
    users: tuple[tuple[str, Budget], ...] = ()

    def of(self, user: str) -> Budget:
        return dict(self.users).get(user, self.default)

    @property
    def limited(self) -> bool:
        return self.default.limited or any(b.limited for _, b in self.users)


def read_config(path: Path, environ: Mapping[str, str]) -> dict[str, object]:
    """The ``Settings`` values the file at ``path`` names (keys it leaves out are absent).

    Raises ``ConfigError`` for a file that cannot be read or parsed and for any bad value.
    API keys are read from ``environ`` by the variable each upstream names.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    _only(data, "", {"default_model", "models", "mcp_servers", "tools", "budgets"})
    values: dict[str, object] = {}
    if "models" in data:
        values["upstreams"] = _upstreams(_table(data["models"], "models"), environ)
    if "default_model" in data:
        values["model"] = _string(data["default_model"], "default_model")
    if "mcp_servers" in data:
        values["mcp_servers"] = _mcp_servers(data["mcp_servers"])
    if "tools" in data:
        tools = _table(data["tools"], "tools")
        _only(tools, "tools", {"need_approval"})
        if "need_approval" in tools:
            values["approval_tools"] = _strings(tools["need_approval"], "tools.need_approval")
    if "budgets" in data:
        values["budgets"] = _budgets(_table(data["budgets"], "budgets"))
    _check_default(values)
    return values


def _check_default(values: Mapping[str, object]) -> None:
    upstreams = values.get("upstreams")
    model = values.get("model")
    if isinstance(upstreams, tuple) and isinstance(model, str):
        if not any(model in u.models for u in upstreams):
            raise ConfigError("default_model", f"{model!r} is not one of the models")


def _upstreams(table: dict[str, object], environ: Mapping[str, str]) -> tuple[Upstream, ...]:
    if not table:
        raise ConfigError("models", "name at least one model server")
    upstreams: list[Upstream] = []
    served: dict[str, str] = {}
    for name, raw in table.items():
        key = f"models.{name}"
        entry = _table(raw, key)
        upstream = _offline(entry, key) if name == OFFLINE else _openai(name, entry, key, environ)
        for model in upstream.models:
            if model in served:
                raise ConfigError(f"{key}.models",
                                  f"{model!r} is served by models.{served[model]} already")
            served[model] = name
        upstreams.append(upstream)
    return tuple(upstreams)


def _offline(entry: dict[str, object], key: str) -> Upstream:
    _only(entry, key, set())
    return Upstream(OFFLINE, "offline", (OFFLINE,))


def _openai(name: str, entry: dict[str, object], key: str,
            environ: Mapping[str, str]) -> Upstream:
    _only(entry, key, {"base_url", "api_key_env", "models"})
    if "base_url" not in entry:
        raise ConfigError(f"{key}.base_url", "missing (the server's URL, ending in /v1)")
    base_url = _string(entry["base_url"], f"{key}.base_url")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{key}.base_url", "expected an http:// or https:// URL")
    key_env = None
    if "api_key_env" in entry:
        key_env = _string(entry["api_key_env"], f"{key}.api_key_env")
    if "models" not in entry:
        raise ConfigError(f"{key}.models", "missing (the model ids this server serves)")
    models = _strings(entry["models"], f"{key}.models")
    if not models:
        raise ConfigError(f"{key}.models", "name at least one model id")
    api_key = (environ.get(key_env) or None) if key_env else None
    return Upstream(name, "openai", models, base_url, key_env, api_key)


def _mcp_servers(raw: object) -> tuple[McpServer, ...]:
    if not isinstance(raw, list):
        raise ConfigError("mcp_servers", "expected a list of tables ([[mcp_servers]])")
    servers: list[McpServer] = []
    for index, item in enumerate(raw):
        key = f"mcp_servers[{index}]"
        entry = _table(item, key)
        _only(entry, key, {"name", "command", "args", "url", "env"})
        if "name" not in entry:
            raise ConfigError(f"{key}.name", "missing")
        name = _string(entry["name"], f"{key}.name")
        if any(s.name == name for s in servers):
            raise ConfigError(f"{key}.name", f"{name!r} is named twice")
        if ("command" in entry) == ("url" in entry):
            raise ConfigError(key, "give either command (stdio) or url (Streamable HTTP)")
        if "url" in entry:
            if "args" in entry or "env" in entry:
                raise ConfigError(key, "args and env go with command, not url")
            url = _string(entry["url"], f"{key}.url")
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"{key}.url", "expected an http:// or https:// URL")
            servers.append(McpServer(name, url=url))
            continue
        command = (_string(entry["command"], f"{key}.command"),)
        args = _strings(entry.get("args", []), f"{key}.args")
        env = _table(entry.get("env", {}), f"{key}.env")
        pairs = tuple((k, _string(v, f"{key}.env.{k}")) for k, v in env.items())
        servers.append(McpServer(name, command=command + args, env=pairs))
    return tuple(servers)


def _budgets(table: dict[str, object]) -> Budgets:
    _only(table, "budgets", {"daily_tokens", "models", "users"})
    default = _budget(table, "budgets")
    users = _table(table.get("users", {}), "budgets.users")
    own = tuple((user, _budget(_table(raw, f"budgets.users.{user}"), f"budgets.users.{user}"))
                for user, raw in users.items())
    return Budgets(default, own)


def _budget(table: dict[str, object], key: str) -> Budget:
    if key != "budgets":
        _only(table, key, {"daily_tokens", "models"})
    daily = None
    if "daily_tokens" in table:
        daily = _positive(table["daily_tokens"], f"{key}.daily_tokens")
    models = _table(table.get("models", {}), f"{key}.models")
    per_model = tuple((m, _positive(v, f"{key}.models.{m}")) for m, v in models.items())
    return Budget(daily, per_model)


# -- value checks -------------------------------------------------------------------------


def _only(table: Mapping[str, object], key: str, allowed: set[str]) -> None:
    for name in table:
        if name not in allowed:
            where = f"{key}.{name}" if key else name
            known = ", ".join(sorted(allowed)) or "nothing"
            raise ConfigError(where, f"unknown key (expected {known})")


def _table(value: object, key: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a table")
    return value


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, "expected a string")
    if not value.strip():
        raise ConfigError(key, "cannot be empty")
    return value


def _strings(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list of strings")
    return tuple(_string(item, f"{key}[{i}]") for i, item in enumerate(value))


def _positive(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, "expected a positive integer")
    return value
