"""One benchmark run: the upstream, the baseline, then each store through ``eventchat serve``.

The bench process (the load generator) is pinned to CPU 1 with the upstream, the server to
CPU 0, when the machine has two CPUs or more. Each store gets a fresh server process: SQLite in
a temporary data dir, PostgreSQL in a fresh schema dropped afterwards. Idle-connection memory
is measured on a fresh server each time, so that memory freed by earlier phases cannot hide
what connections cost.
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import trio

from ..config import Settings
from ..projections.bench import run_bench
from . import processes as p
from .clients import LoadResult, direct_chats, run_load, sse_chats, websocket_chats
from .figures import (
    idle_figures,
    load_figures,
    log_figures,
    ttft_figures,
    write_rate_figures,
)
from .idle import METRICS_TOKEN, measure_idle
from .options import PACED, QUICK_PACED, Options
from .progress import say
from .upstream import expected_text, pacing

SERVER_CPU, LOAD_CPU = 0, 1


class Server:
    """A running ``eventchat serve`` and what the bench needs to talk to it."""

    def __init__(self, child: p.Child, port: int, token: str) -> None:
        self.child, self.port, self.token = child, port, token
        self.base = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws/chat?access_token={token}"

    def http(self, connections: int = 10) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base, headers={"Authorization": f"Bearer {self.token}"},
            timeout=60, limits=httpx.Limits(max_connections=connections))


def run(options: Options) -> dict[str, Any]:
    p.pin(LOAD_CPU)
    with tempfile.TemporaryDirectory(prefix="eventchat-bench-") as tmp:
        workdir = Path(tmp)
        say(f"starting the model server ({options.chunks} chunks an answer)")
        upstream, upstream_port = p.start_upstream(options.chunks, workdir)
        try:
            p.pin(LOAD_CPU, upstream.pid)
            base_url = f"http://127.0.0.1:{upstream_port}/v1"
            results: dict[str, Any] = {"baseline": _baseline(options, base_url), "stores": {}}
            results["baseline"]["idle_floor"] = _idle_floor(options, workdir)
            for store in options.stores:
                results["stores"][store] = _store(options, store, base_url, workdir / store)
        finally:
            upstream.stop()
    return results


def _idle_floor(options: Options, workdir: Path) -> dict[str, Any]:
    """Idle memory of the framework alone (``app.bench.floor``): the baseline for eventchat's."""
    say(f"baseline: {options.idle_connections} idle connections to the bare framework")
    child, port = p.start_server(dict(os.environ), workdir, bare=True)
    try:
        p.pin(SERVER_CPU, child.pid)
        idle = trio.run(measure_idle, port, "unused", options.idle_connections, False, False,
                        child.rss_bytes, options.settle_s)
    finally:
        child.stop()
    return idle_figures(idle)


async def _paced(name: str, options: Options, open_chat: Any) -> LoadResult:
    """The same chats with people's pauses between turns: TTFT below capacity."""
    say(f"{name}: {options.chats} chats x {options.messages} turns, pauses of about "
        f"{options.think_s:g} s")
    return await run_load(name, options.chats, options.messages, expected_text(options.chunks),
                          open_chat, think_s=options.think_s)


def _baseline(options: Options, base_url: str) -> dict[str, Any]:
    async def main() -> tuple[LoadResult, float, LoadResult]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0) as client:
            cpu = _Meter(_own_cpu)
            say(f"baseline: {options.chats} chats x {options.messages} turns, straight to the "
                "model server")
            load = await run_load("baseline", options.chats, options.messages,
                                  expected_text(options.chunks), direct_chats(client, "bench"),
                                  cpu.start, cpu.stop)
            say(f"baseline: one chat x {options.single_chat_messages} turns")
            alone = await run_load("baseline, one chat", 1, options.single_chat_messages,
                                   expected_text(options.chunks), direct_chats(client, "bench"))
            paced.append(await _paced("baseline, paced", options,
                                      direct_chats(client, "bench")))
        return load, cpu.used, alone

    paced: list[LoadResult] = []
    load, client_cpu, alone = trio.run(main)
    figures = load_figures(load, None)
    figures["one_chat"] = load_figures(alone, None)
    figures["paced"] = load_figures(paced[0], None)
    figures["client_cpu_us_per_chunk"] = round(client_cpu / max(1, load.chunks) * 1e6, 1)
    return figures


def _store(options: Options, store: str, upstream_url: str, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    with _database(options, store) as schema:
        env = _server_env(options, upstream_url, workdir, schema)
        token = p.add_user(env)
        figures: dict[str, Any] = {}
        say(f"{store}: starting eventchat serve")
        with _server(env, workdir, token) as server:
            figures["websocket"], figures["log"] = _websocket_phase(options, server, schema)
            figures["sse"] = _sse_phase(options, server, store)
            figures["write_rate"] = _write_rate_phase(options, server, schema)
        for deflate in (False, True):
            for exchange in (False, True):
                say(f"{store}: {options.idle_connections} idle connections"
                    f"{', permessage-deflate' if deflate else ''}"
                    f"{', one frame each way first' if exchange else ''} (a fresh server)")
                with _server(env, workdir, token) as server:
                    idle = trio.run(measure_idle, server.port, token, options.idle_connections,
                                    deflate, exchange, server.child.rss_bytes, options.settle_s)
                key = "idle" + "_deflate" * deflate + "_after_frame" * exchange
                figures[key] = idle_figures(idle)
        # without the keep-alive pings (one Hypercorn task per connection)
        say(f"{store}: {options.idle_connections} idle connections, no keep-alive pings")
        with _server({**env, "EVENTCHAT_WS_PING_INTERVAL_S": "0"}, workdir, token) as server:
            idle = trio.run(measure_idle, server.port, token, options.idle_connections,
                            False, False, server.child.rss_bytes, options.settle_s)
        figures["idle_no_pings"] = idle_figures(idle)
        settings = Settings(data_dir=workdir / "projections", store_threads=4)
        if schema is not None:
            settings = settings.replace(database_url=options.database_url,
                                        database_schema=f"{schema}_views")
        say(f"{store}: the views: {options.projection_events} events written and rebuilt, "
            f"{options.projection_reads} page reads")
        with _schema(options.database_url if schema else None, settings.database_schema):
            figures["projections"] = run_bench(settings, options.projection_events,
                                               options.projection_messages,
                                               options.projection_reads)
    return figures


def _websocket_phase(options: Options, server: Server, schema: str | None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    cpu = _Meter(server.child.cpu_seconds)
    writes = _Meter(lambda: p.write_transactions(options.database_url, schema or "")
                    if schema else 0.0)
    commits = _Meter(lambda: p.xact_commits(options.database_url) if schema else 0.0)

    profiler = _Profiler(options.profile, server.child.pid, "postgres" if schema else "sqlite")

    def start() -> None:
        for meter in (cpu, writes, commits):
            meter.start()
        profiler.start()

    def stop() -> None:
        for meter in (cpu, writes, commits):
            meter.stop()
        profiler.stop()

    chats: list[str] = []
    alone: list[LoadResult] = []
    #: seconds from model call to first text, as the server recorded them (paced turns)
    model_ttft: list[float] = []

    store = "postgres" if schema else "sqlite"

    async def main() -> tuple[LoadResult, dict[str, int]]:
        say(f"{store}: websocket: {options.chats} chats x {options.messages} turns")
        load = await run_load(f"{store}: websocket", options.chats, options.messages,
                              expected_text(options.chunks), websocket_chats(server.ws_url),
                              start, stop)
        say(f"{store}: websocket: one chat x {options.single_chat_messages} turns")
        alone.append(await run_load("websocket, one chat", 1, options.single_chat_messages,
                                    expected_text(options.chunks), websocket_chats(server.ws_url)))
        async with server.http() as http:
            before_paced = {c["id"] for c in await _all_chats(http)}
        alone.append(await _paced(f"{store}: websocket, paced", options,
                                  websocket_chats(server.ws_url)))
        async with server.http() as http:
            chats.extend(c["id"] for c in await _all_chats(http))
            counts: dict[str, int] = {}
            for chat_id in chats:
                for event in await _events(http, chat_id):
                    counts[event["type"]] = counts.get(event["type"], 0) + 1
                    if event["type"] == "ResponseCompleted" and chat_id not in before_paced:
                        model_ttft.append(event["data"]["timing"]["ttft_ms"] / 1000)
        return load, counts

    load, counts = trio.run(main)
    figures = load_figures(load, cpu.used)
    figures["one_chat"] = load_figures(alone[0], None)
    figures["paced"] = load_figures(alone[1], None)
    # what the server itself measured of the paced turns: model call to first chunk
    figures["paced"]["model_ttft_ms"] = ttft_figures(model_ttft)
    log = log_figures(counts, load.turns, writes.used if schema else None,
                      commits.used if schema else None)
    return figures, log


def _sse_phase(options: Options, server: Server, store: str) -> dict[str, Any]:
    cpu = _Meter(server.child.cpu_seconds)

    async def main() -> LoadResult:
        say(f"{store}: sse (POST /generate): {options.chats} chats x {options.messages} turns")
        async with server.http(options.chats + 5) as http:
            return await run_load("sse", options.chats, options.messages,
                                  expected_text(options.chunks), sse_chats(http),
                                  cpu.start, cpu.stop)

    return load_figures(trio.run(main), cpu.used)


def _write_rate_phase(options: Options, server: Server, schema: str | None
                      ) -> list[dict[str, Any]]:
    async def one(model: str) -> dict[str, Any]:
        async with server.http() as http:
            chat_id = (await http.post("/chat", json={"model": model})).json()["id"]

            async def existing() -> str:
                return str(chat_id)

            chunks, _ = pacing(model, options.chunks)
            async with websocket_chats(server.ws_url, existing)() as turn:
                _, _, text, status = await turn(1)
            events = await _events(http, chat_id)
        started = next(e["seq"] for e in events if e["type"] == "ResponseStarted")
        writes = (await trio.to_thread.run_sync(
            _chat_write_transactions, options.database_url, schema, chat_id, started)
            if schema else None)
        # the whole text, in order (a lagging client gets merged deltas: fewer frames)
        ok = status == "complete" and text == expected_text(chunks)
        return write_rate_figures(model, chunks, ok, events, writes)

    async def main() -> list[dict[str, Any]]:
        say(f"{'postgres' if schema else 'sqlite'}: write rate during long answers: "
            f"{', '.join(options.paced_models)}")
        return [await one(model) for model in options.paced_models]

    return trio.run(main)


def _chat_write_transactions(url: str, schema: str, chat_id: str, from_seq: int) -> int:
    with p.admin_connection(url) as conn:
        row = conn.execute(
            f'SELECT count(DISTINCT xmin::text) FROM "{schema}"."{p.EVENTS_TABLE}" '
            "WHERE originator_id = %s AND originator_version >= %s",
            (uuid.UUID(chat_id), from_seq)).fetchone()
    return int(row[0]) if row else 0


async def _all_chats(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    chats, cursor = [], None
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        page = (await http.get("/chats", params=params)).json()
        chats += page["chats"]
        cursor = page["next_cursor"]
        if not cursor:
            return chats


async def _events(http: httpx.AsyncClient, chat_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = (await http.get(f"/chat/{chat_id}/events",
                               params={"after_seq": after, "limit": 500})).json()
        events += page["events"]
        if not page["events"] or page["next_after_seq"] in (None, after):
            return events
        after = page["next_after_seq"]


class _Profiler:
    """``py-spy record --gil`` of the server while the load runs (where its Python CPU time
    goes: only threads holding the GIL are sampled), as collapsed stacks."""

    def __init__(self, directory: Path | None, pid: int, name: str) -> None:
        self.directory, self.pid, self.name = directory, pid, name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"server-{self.name}-websocket.txt"
        self.proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.pid), "--rate", "250", "--gil",
             "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)


class _Meter:
    """The growth of a reading between ``start()`` and ``stop()``."""

    def __init__(self, read: Callable[[], float]) -> None:
        self.read = read
        self.first = self.used = 0.0

    def start(self) -> None:
        self.first = self.read()

    def stop(self) -> None:
        self.used = self.read() - self.first


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_env(options: Options, upstream_url: str, workdir: Path, schema: str | None
                ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EVENTCHAT_", "OPENAI_"))}
    env.update({
        "EVENTCHAT_PROVIDER": "openai", "OPENAI_BASE_URL": upstream_url,
        "OPENAI_API_KEY": "bench", "EVENTCHAT_MODEL": "bench",
        # the paced runs' chats name the model server's pacing as their model: list them
        "EVENTCHAT_MODELS": ",".join((*PACED, *QUICK_PACED)),
        "EVENTCHAT_METRICS_TOKEN": METRICS_TOKEN,
        "EVENTCHAT_DATA_DIR": str(workdir / "data"),
        # One bench user sends for every chat: lift the per-user limits out of the way.
        "EVENTCHAT_MESSAGES_PER_MINUTE": "100000000",
        "EVENTCHAT_CONCURRENT_RESPONSES": "100000",
        "EVENTCHAT_CHATS_PER_HOUR": "100000000",
        "EVENTCHAT_WS_CONNECTIONS_PER_USER": "100000",
        "EVENTCHAT_FOLLOWS_PER_CONNECTION": "100000",
    })
    if schema is not None:
        env["EVENTCHAT_DATABASE_URL"] = options.database_url
        env["EVENTCHAT_DATABASE_SCHEMA"] = schema
    return env


@contextmanager
def _database(options: Options, store: str) -> Iterator[str | None]:
    if store != "postgres":
        yield None
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with _schema(options.database_url, schema):
        yield schema


@contextmanager
def _schema(url: str | None, schema: str) -> Iterator[None]:
    if url is None:
        yield
        return
    p.create_schema(url, schema)
    try:
        yield
    finally:
        p.drop_schema(url, schema)


@contextmanager
def _server(env: dict[str, str], workdir: Path, token: str) -> Iterator[Server]:
    child, port = p.start_server(env, workdir)
    try:
        p.pin(SERVER_CPU, child.pid)
        yield Server(child, port, token)
    finally:
        child.stop()


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {"cpus": p.cpus(), "cpu_model": model, "memory_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "pinned": p.cpus() >= 2}
