"""Settings from the environment: names, types, defaults, and refusals naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings, SettingsError


def test_environment_values_are_read_and_typed() -> None:
    settings = Settings.from_env({
        "EVENTCHAT_PORT": "9001",
        "EVENTCHAT_TOKEN_FLUSH_MS": "25.5",
        "EVENTCHAT_COMPRESS": "yes",
        "EVENTCHAT_ALLOWED_ORIGINS": "https://a.example, https://b.example",
        "EVENTCHAT_DATA_DIR": "/srv/chat",
        "EVENTCHAT_WS_PING_INTERVAL_S": "0",
        "EVENTCHAT_MODEL": "",  # empty counts as unset
    })
    assert settings.port == 9001 and settings.token_flush_ms == 25.5
    assert settings.compress is True and settings.data_dir == Path("/srv/chat")
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.ws_ping_interval_s == 0 and settings.model is None
    assert settings.projection_delay_ms == 20.0  # a default


def test_the_provider_follows_the_upstream_settings_unless_named() -> None:
    assert Settings.from_env({}).provider == "offline"
    assert Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}).provider == "openai"
    named = Settings.from_env({"OPENAI_API_KEY": "k", "EVENTCHAT_PROVIDER": "offline"})
    assert named.provider == "offline" and named.openai_api_key == "k"


def test_flags_win_over_the_environment() -> None:
    settings = Settings.from_env({"EVENTCHAT_PORT": "9001"}, port=9002, host=None)
    assert settings.port == 9002 and settings.host == "127.0.0.1"


@pytest.mark.parametrize(("environ", "named"), [
    ({"EVENTCHAT_PORT": "abc"}, "EVENTCHAT_PORT"),
    ({"EVENTCHAT_PROVIDER": "claude"}, "EVENTCHAT_PROVIDER"),
    ({"EVENTCHAT_DATABASE_URL": "mysql://x"}, "EVENTCHAT_DATABASE_URL"),
    ({"EVENTCHAT_TOKEN_FLUSH_MS": "0"}, "EVENTCHAT_TOKEN_FLUSH_MS"),
    ({"EVENTCHAT_PROJECTION_DELAY_MS": "-1"}, "EVENTCHAT_PROJECTION_DELAY_MS"),
    ({"EVENTCHAT_WS_PING_INTERVAL_S": "-5"}, "EVENTCHAT_WS_PING_INTERVAL_S"),
])
def test_unusable_values_are_refused_by_name(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(environ)
