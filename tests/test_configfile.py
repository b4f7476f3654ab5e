"""The configuration file: a full example read into settings, and bad values refused in one
line naming the key, on its own and through the command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import Settings, SettingsError
from app.configfile import Budget, McpServer, Upstream

FULL = """
default_model = "qwen2.5"

[models.local]
base_url = "http://127.0.0.1:11434/v1"
models = ["llama3.1", "qwen2.5"]

[models.openai]
base_url = "https://api.openai.com/v1"
api_key_env = "TEAM_OPENAI_KEY"
models = ["gpt-4o-mini", "gpt-4o"]

[models.offline]

[[mcp_servers]]
name = "time"
command = "uvx"
args = ["mcp-server-time", "--local-timezone=UTC"]
env = { LOG_LEVEL = "warning" }

[[mcp_servers]]
name = "docs"
url = "https://mcp.example/mcp"

[tools]
need_approval = ["calculator", "time.get_current_time"]

[budgets]
daily_tokens = 200000
models = { "gpt-4o" = 50000 }

[budgets.users.alice]
daily_tokens = 1000000
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "eventchat.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_full_file_is_read_into_settings(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    s = Settings.from_env({"EVENTCHAT_CONFIG": str(path), "TEAM_OPENAI_KEY": "sk-team",
                           "EVENTCHAT_PORT": "9001"})
    assert s.config_file == path and s.port == 9001
    assert s.catalog() == (
        Upstream("local", "openai", ("llama3.1", "qwen2.5"), "http://127.0.0.1:11434/v1"),
        Upstream("openai", "openai", ("gpt-4o-mini", "gpt-4o"), "https://api.openai.com/v1",
                 "TEAM_OPENAI_KEY", "sk-team"),
        Upstream("offline", "offline", ("offline",)),
    )
    assert s.default_model == "qwen2.5"
    assert s.model_ids() == ("llama3.1", "qwen2.5", "gpt-4o-mini", "gpt-4o", "offline")
    assert s.mcp_servers == (
        McpServer("time", ("uvx", "mcp-server-time", "--local-timezone=UTC"),
                  env=(("LOG_LEVEL", "warning"),)),
        McpServer("docs", url="https://mcp.example/mcp"),
    )
    assert s.approval_tools == ("calculator", "time.get_current_time")
    assert s.budgets.of("bob") == Budget(200_000, (("gpt-4o", 50_000),))
    assert s.budgets.of("alice") == Budget(1_000_000)
    assert "sk-team" not in repr(s)


def test_the_flag_names_the_file_and_the_environment_wins_over_it(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    s = Settings.from_env({"EVENTCHAT_MODEL": "gpt-4o"}, config_file=path)
    assert s.default_model == "gpt-4o" and s.config_file == path
    with pytest.raises(SettingsError, match="'nope' .* is not one of the configured models"):
        Settings.from_env({"EVENTCHAT_MODEL": "nope"}, config_file=path)


def test_without_a_file_the_environment_names_one_upstream() -> None:
    offline = Settings.from_env({})
    assert offline.catalog() == (Upstream("offline", "offline", ("offline",)),)
    s = Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1", "OPENAI_API_KEY": "k",
                           "EVENTCHAT_MODEL": "m1", "EVENTCHAT_MODELS": "m2, m1"})
    assert s.catalog() == (Upstream("openai", "openai", ("m1", "m2"), "http://127.0.0.1:8080/v1",
                                    "OPENAI_API_KEY", "k"),)
    assert s.default_model == "m1"


@pytest.mark.parametrize(("text", "message"), [
    ('[models.local]\nbase_url = 5\nmodels = ["a"]', "models.local.base_url: expected a string"),
    ('[models.local]\nmodels = ["a"]', "models.local.base_url: missing"),
    ('[models.local]\nbase_url = "ftp://x"\nmodels = ["a"]', "models.local.base_url: expected an"),
    ('[models.local]\nbase_url = "http://x/v1"\nmodels = "a"',
     "models.local.models: expected a list of strings"),
    ('[models.a]\nbase_url = "http://x/v1"\nmodels = ["m"]\n'
     '[models.b]\nbase_url = "http://y/v1"\nmodels = ["m"]',
     "models.b.models: 'm' is served by models.a already"),
    ('[models.local]\nbase_url = "http://x/v1"\nmodels = ["a"]\napi_key = "sk"',
     "models.local.api_key: unknown key"),
    ('default_model = "b"\n[models.local]\nbase_url = "http://x/v1"\nmodels = ["a"]',
     "default_model: 'b' is not one of the models"),
    ('[[mcp_servers]]\nname = "t"', "mcp_servers[0]: give either command"),
    ('[[mcp_servers]]\nname = "t"\nurl = "http://x"\nargs = ["-v"]', "mcp_servers[0]: args"),
    ('[[mcp_servers]]\ncommand = "x"', "mcp_servers[0].name: missing"),
    ('[[mcp_servers]]\nname = "t"\ncommand = "x"\n[[mcp_servers]]\nname = "t"\ncommand = "y"',
     "mcp_servers[1].name: 't' is named twice"),
    ("[tools]\nneed_approval = [1]", "tools.need_approval[0]: expected a string"),
    ("[budgets]\ndaily_tokens = 0", "budgets.daily_tokens: expected a positive integer"),
    ('[budgets.users.bob]\nmodels = { "m" = "lots" }',
     "budgets.users.bob.models.m: expected a positive integer"),
    ("colour = 1", "colour: unknown key"),
    ("[models\n", "is not valid TOML"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)) as caught:
        Settings.from_env({}, config_file=write(tmp_path, text))
    assert str(caught.value).startswith("config error: ") and "\n" not in str(caught.value)


def test_a_bad_file_stops_every_command_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[models.local]\nbase_url = 5\nmodels = ["a"]')
    for command in (["serve"], ["users", "list"], ["projections", "status"]):
        done = subprocess.run([sys.executable, "-m", "app.cli", *command, "--config", str(path),
                               "--data-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, command
        assert done.stderr == ("eventchat: config error: models.local.base_url:"
                               " expected a string\n"), command


def test_the_documented_example_is_a_valid_file(tmp_path: Path) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text("utf-8")
    example = "#" + doc.split("```toml\n# eventchat.toml", 1)[1].split("```", 1)[0]
    s = Settings.from_env({"OPENAI_API_KEY": "sk-x"}, config_file=write(tmp_path, example))
    assert s.default_model == "llama3.1" and len(s.catalog()) == 3
    assert [m.name for m in s.mcp_servers] == ["files", "search"]
    assert s.budgets.of("alice").for_model("gpt-4o") == 200_000
