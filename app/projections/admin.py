"""Blocking helpers for the command line: rebuild the views from zero, report their status."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ..config import Settings
from ..events.application import ChatApplication
from ..storage.recorder import persistence_env
from .views import open_views

REBUILD_BATCH = 2000


def rebuild(settings: Settings, progress: bool = True, batch_size: int = REBUILD_BATCH) -> int:
    """Drops every view and rebuilds it from the whole log; returns the events processed.

    Stop the servers sharing the store first: a live updater would keep projecting into the
    views while they are rebuilt. With ``progress`` a bar is drawn on stderr.
    """
    app = ChatApplication(env=persistence_env(settings))
    views = open_views(settings)
    try:
        views.reset()
        total = app.max_position()
        bar = ProgressBar(total, sys.stderr) if progress else None
        position = done = 0
        while True:
            notifications = app.select(position + 1, batch_size)
            if not notifications:
                break
            position = views.apply(notifications, app.mapper)
            done += len(notifications)
            if bar is not None:
                bar.update(done)
        if bar is not None:
            bar.finish(done)
        return done
    finally:
        views.close()
        app.close()


def status(settings: Settings) -> dict[str, Any]:
    """Where the views are: their position, the log's end, the lag between them, and the
    events they passed over because they could not be projected (the latest 20)."""
    app = ChatApplication(env=persistence_env(settings))
    views = open_views(settings)
    try:
        position = views.read_position()
        max_position = app.max_position()
        skipped, latest = views.read_skipped(20)
        return {
            "position": position,
            "max_position": max_position,
            "lag": max(0, max_position - position),
            "store": settings.store_kind,
            "views": views.db.location,
            "skipped_events": skipped,
            "skipped": latest,
        }
    finally:
        views.close()
        app.close()


class ProgressBar:
    """A one-line progress bar redrawn at most ten times a second."""

    def __init__(self, total: int, out: TextIO, width: int = 30) -> None:
        self.total, self.out, self.width = max(total, 1), out, width
        self.started = self.drawn = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.drawn >= 0.1:
            self.drawn = now
            self._draw(done, now)

    def finish(self, done: int) -> None:
        self._draw(done, time.monotonic())
        self.out.write("\n")
        self.out.flush()

    def _draw(self, done: int, now: float) -> None:
        fraction = min(1.0, done / self.total)
        filled = int(fraction * self.width)
        rate = done / max(now - self.started, 1e-9)
        bar = "#" * filled + "-" * (self.width - filled)
        self.out.write(f"\r[{bar}] {done:,}/{self.total:,} events  {rate:,.0f}/s")
        self.out.flush()
