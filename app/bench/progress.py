"""What the bench is doing, on stderr as it goes: phase names and counts, with the time
since the start, so that a run of several minutes is never silent."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import trio

_START = time.monotonic()
#: Seconds between two counts of a running load.
TICK_S = 5.0


def say(text: str) -> None:
    elapsed = int(time.monotonic() - _START)
    print(f"[bench {elapsed // 60}:{elapsed % 60:02d}] {text}", file=sys.stderr, flush=True)


async def tick(name: str, done: Callable[[], int], total: int) -> None:
    """Says every ``TICK_S`` how many of ``total`` turns of ``name`` are done, until
    cancelled."""
    while True:
        await trio.sleep(TICK_S)
        say(f"{name}: {done()}/{total} turns")
