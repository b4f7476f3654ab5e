"""Keeping SQLite's write-ahead logs small, so a full disk is met late and recovered from.

SQLite checkpoints a WAL into its database after about 1,000 pages (4 MiB) by default and
never shrinks the file afterwards; a streaming reply rewrites the same rows many times, so a
20 KB reply could need megabytes of WAL. ``keep_small`` checkpoints a database's WAL and
truncates it (``PRAGMA wal_checkpoint(TRUNCATE)``) whenever it grows beyond a limit, from a
worker thread, on a connection of its own. A checkpoint that cannot finish (a reader holds
an old snapshot) is simply tried again later.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import trio

log = logging.getLogger(__name__)

#: A WAL larger than this is checkpointed and truncated.
LIMIT_BYTES = 512 * 1024
INTERVAL_S = 1.0


def checkpoint(path: Path, limit_bytes: int = LIMIT_BYTES) -> bool:
    """Blocking: checkpoints and truncates ``path``'s WAL if it is over ``limit_bytes``;
    True if it did."""
    wal = path.with_name(path.name + "-wal")
    try:
        if wal.stat().st_size <= limit_bytes:
            return False
    except FileNotFoundError:
        return False
    conn = sqlite3.connect(path, timeout=0.5, isolation_level=None)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy
    finally:
        conn.close()


async def keep_small(
    *paths: Path, limit_bytes: int = LIMIT_BYTES, interval_s: float = INTERVAL_S
) -> None:
    """Checks ``paths`` every ``interval_s`` until cancelled; errors are logged and retried."""
    limiter = trio.CapacityLimiter(1)
    while True:
        await trio.sleep(interval_s)
        for path in paths:
            try:
                await trio.to_thread.run_sync(checkpoint, path, limit_bytes, limiter=limiter)
            except sqlite3.Error as exc:
                log.warning("could not checkpoint %s: %s", path.name, exc)
