"""``eventchat bench --quick --store sqlite`` end to end: every figure present and sane.

Real processes (the upstream and ``eventchat serve``), real sockets; no timing thresholds,
only counts that must match and values that must make sense.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_quick_bench_on_sqlite(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--quick", "--store", "sqlite",
         "--chats", "3", "--messages", "2", "--chunks", "7", "--idle-connections", "50",
         "--settle-ms", "200",
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "turns completed / requested" in done.stdout
    assert "paced 3 chats: TTFT p50 ms" in done.stdout  # the chats it ran, not 50
    # what it does, on stderr as it goes: the stores first, then each phase with counts
    progress = done.stderr.splitlines()
    assert "stores: sqlite; 3 chats x 2 turns" in progress[0]
    for phase in ("baseline: 3 chats x 2 turns", "sqlite: websocket: 3 chats x 2 turns",
                  "sse (POST /generate)", "sqlite: 50 idle connections", "sqlite: the views",
                  "done; every figure in"):
        assert any(phase in line for line in progress), (phase, progress)
    results = json.loads(out.read_text())
    assert results["machine"]["cpus"] >= 1

    base = results["baseline"]
    _check_load(base, turns=6, chunks=7)
    assert base["client_cpu_us_per_chunk"] > 0
    floor = base["idle_floor"]  # the bare framework's idle connections, eventchat's baseline
    assert floor["connections"] == floor["server_counted"] == 50
    assert floor["kib_per_connection"] > 0

    store = results["stores"]["sqlite"]
    for name in ("websocket", "sse"):
        load = store[name]
        _check_load(load, turns=6, chunks=7)
        assert load["server_cpu_us_per_chunk"] > 0
        assert load["added_ttft_ms"]["p50"] is not None
        assert load["vs_baseline"]["turns_per_s"] > 0
    one = store["websocket"]["one_chat"]
    _check_load(one, turns=5, chunks=7)
    assert one["added_ttft_ms"]["p50"] is not None
    _check_load(base["one_chat"], turns=5, chunks=7)
    paced = store["websocket"]["paced"]
    _check_load(paced, turns=6, chunks=7)
    _check_load(base["paced"], turns=6, chunks=7)
    assert paced["added_ttft_ms"]["p50"] is not None
    # the server's own measure of the model call: at most what the client waited
    assert 0 < paced["model_ttft_ms"]["p50"] <= paced["ttft_ms"]["p99"]
    assert "paced: added TTFT p50 ms" in done.stdout

    per_response = store["log"]["events_per_response"]
    # warm-up and measured turns of the load, of the one-chat run (5 turns with --quick) and
    # of the paced run, every one answered: one of each, tokens in batches
    assert store["log"]["responses"] == 3 * (2 + 1) + (5 + 1) + 3 * (2 + 1)
    for kind in ("MessageReceived", "ResponseStarted", "ResponseCompleted"):
        assert per_response[kind] == 1.0
    assert 1.0 <= per_response["TokensGenerated"] <= 7

    for run in store["write_rate"]:
        assert run["complete"]
        assert run["token_batches"] >= 1
        if run["min_periodic_flush_gap_ms"] is not None:
            assert run["min_periodic_flush_gap_ms"] >= 55  # token_flush_ms = 60

    for key, offered in (("idle", False), ("idle_deflate", True), ("idle_after_frame", False),
                         ("idle_deflate_after_frame", True), ("idle_no_pings", False)):
        idle = store[key]
        assert idle["one_frame_each_way_first"] is key.endswith("after_frame")
        assert idle["connections"] == idle["server_counted"] == 50
        assert idle["permessage_deflate_offered"] is offered
        assert idle["extensions_negotiated"] == (["permessage-deflate"] if offered else [])
        assert idle["server_rss_after_mib"] > 0

    views = store["projections"]
    assert views["events"] >= 2000
    assert views["rebuild_events_per_s"] > 0 and views["page_median_ms"] > 0


def _check_load(load: dict, turns: int, chunks: int) -> None:
    assert load["turns_requested"] == turns
    assert load["turns_completed"] == turns, load["errors"]
    assert load["turns_wrong"] == 0
    assert load["chunks_received"] == turns * chunks
    assert turns <= load["delta_frames"] <= turns * chunks
    assert load["turns_per_s"] > 0 and load["chunks_per_s"] > 0
    assert 0 < load["ttft_ms"]["p50"] <= load["ttft_ms"]["p99"]


def test_bench_help_is_plain_text_and_imports_nothing_heavy() -> None:
    probe = (
        "import sys\n"
        "from app.cli import main\n"
        "try:\n"
        "    main(['bench', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'httpx', 'openai', 'psycopg', 'eventsourcing', 'quart', 'hypercorn', 'wsproto'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=30, check=True)
    assert done.stderr == "[]\n"
    assert "usage: eventchat bench" in done.stdout
    assert "``" not in done.stdout and "--store" in done.stdout
    assert "default: both" in done.stdout


def test_bench_needs_nothing_beyond_the_readme_install() -> None:
    """``pip install -e .`` (the README's) brings what ``eventchat bench`` imports."""
    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    main = {re.split(r"[<>=\[;\s]", r)[0] for r in project["project"]["dependencies"]}
    assert {"httpx", "wsproto", "openai", "psycopg", "trio-websocket"} <= main
