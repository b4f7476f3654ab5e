"""The processes the benchmark starts: the upstream and ``eventchat serve``, and what it reads
of them (CPU time and resident memory from ``/proc``), plus CPU pinning and PostgreSQL schemas.

Each child gets its soft open-files limit raised to the hard limit before it starts (the limit
survives ``exec``). ``stop()`` sends SIGINT (the server's graceful shutdown), then kills after
a timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from ..config import Settings
from ..storage.postgres import Connection, connect
from .upstream import raise_open_files_limit

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: The event table of the ``eventchat`` application on PostgreSQL.
EVENTS_TABLE = "eventchat_events"


class BenchError(RuntimeError):
    """The benchmark could not run (a process did not start, a check failed)."""


class Child:
    """A started process; its output goes to ``log``."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path,
                 stdout: int | IO[bytes] | None = None) -> None:
        self.log = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=stdout if stdout is not None else self._log,
            stderr=self._log, preexec_fn=raise_open_files_limit,
        )
        self.pid = self.proc.pid
        self.name = " ".join(argv[:4])

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_bytes(self) -> int:
        fields = Path(f"/proc/{self.pid}/statm").read_text().split()
        return int(fields[1]) * PAGE_SIZE

    def pin(self, cpu: int) -> bool:
        return pin(cpu, self.pid)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{self.name} exited ({self.proc.returncode}):\n{tail}")


def pin(cpu: int, pid: int = 0) -> bool:
    """Pins ``pid`` (0: this process) to ``cpu`` when the machine has it."""
    if not hasattr(os, "sched_setaffinity") or cpus() < 2:
        return False
    try:
        os.sched_setaffinity(pid, {cpu})
    except OSError:
        return False
    return True


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start_upstream(chunks: int, workdir: Path) -> tuple[Child, int]:
    child = Child([sys.executable, "-m", "app.bench.upstream", "--port", "0",
                   "--chunks", str(chunks)], dict(os.environ), workdir / "upstream.log",
                  stdout=subprocess.PIPE)
    assert child.proc.stdout is not None
    line = child.proc.stdout.readline().decode()
    if not line.startswith("port "):
        child.stop()
        raise BenchError(f"the upstream did not start: {line!r}")
    return child, int(line.split()[1])


def eventchat_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def add_user(env: dict[str, str], name: str = "bench") -> str:
    done = subprocess.run(eventchat_argv("users", "add", name), env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"eventchat users add failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(env: dict[str, str], workdir: Path, timeout: float = 60.0,
                 bare: bool = False) -> tuple[Child, int]:
    """Starts ``eventchat serve`` (or, ``bare``, the framework-only app of ``app.bench.floor``)
    on a free port and waits until ``/health`` answers 200."""
    port = free_port()
    argv = ([sys.executable, "-m", "app.bench.floor", "--port", str(port)] if bare
            else eventchat_argv("serve", "--host", "127.0.0.1", "--port", str(port)))
    child = Child(argv, env, workdir / ("floor.log" if bare else "server.log"))
    deadline = time.monotonic() + timeout
    while True:
        child.check_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return child, port
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            child.stop()
            raise BenchError(f"{child.name} did not become healthy within {timeout} s")
        time.sleep(0.1)


def admin_connection(url: str, timeout_s: float = 60.0) -> Connection:
    """The bench's own connection to the database at ``url`` (autocommit, bounded by
    ``timeout_s``, named ``eventchat-bench``), to create, inspect and drop its schemas."""
    return connect(Settings(database_url=url, store_timeout_s=timeout_s), "bench")


def create_schema(url: str, schema: str) -> None:
    with admin_connection(url) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')


def drop_schema(url: str, schema: str) -> None:
    with admin_connection(url) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def write_transactions(url: str, schema: str) -> int:
    """Distinct transactions that inserted rows into the schema's event table (``xmin``)."""
    with admin_connection(url) as conn:
        row = conn.execute(
            f'SELECT count(DISTINCT xmin::text) FROM "{schema}"."{EVENTS_TABLE}"').fetchone()
        return int(row[0]) if row else 0


def xact_commits(url: str) -> int:
    """Committed transactions of the whole database so far (``pg_stat_database``)."""
    with admin_connection(url) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT xact_commit FROM pg_stat_database "
                           "WHERE datname = current_database()").fetchone()
        return int(row[0]) if row else 0
