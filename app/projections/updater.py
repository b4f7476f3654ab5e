"""The views updater: follows the event log and keeps the views up to date.

(Not ``eventsourcing``'s ``ProjectionRunner``, which needs a subscription that SQLite lacks.)

A pull loop: read notifications after the tracked position, project them and record the new
position in one transaction, repeat until the log is drained; then sleep until a local save
nudges it (``store.on_saved``) or ``poll_interval`` passes (so writes of other processes are
seen). After a nudge it lets saves gather for ``settings.projection_delay_ms`` (one batch
for a burst of saves, and no projection work in the moment a reply starts streaming), unless
a reader is waiting for the views (``Views.wait_for``). Start it with ``await
nursery.start(updater.run)``: it reports started once it has caught up with the log as it was
at start-up. Cancelling it stops it promptly; a batch being written in a worker thread
finishes (or rolls back) first, never half-applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..config import Settings
from ..events.errors import StoreError
from ..events.store import EventStore
from ..storage.errors import ViewStoreError
from .tracking import Events
from .views import Views

log = logging.getLogger(__name__)


class ViewUpdater:
    """Keeps ``views`` up to date with ``store``'s log; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        views: Views,
        *,
        batch_size: int = 500,
        poll_interval: float = 0.5,
        max_backoff: float = 5.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.views = views
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.position = 0
        self._max_known = 0
        #: When the views last advanced, or were found caught up (trio clock).
        self._progress_at = 0.0
        #: The error of the last failed catch-up, until one succeeds.
        self.failing: str | None = None
        #: Called in the worker thread with the events each batch projected, once committed.
        self.observers: list[Callable[[Events], None]] = []
        self._nudged = trio.Event()

    @property
    def lag(self) -> int:
        """Notifications known to exist beyond the views' position."""
        return max(0, self._max_known - self.position)

    def problems(self, max_lag: int, stall_s: float) -> list[str]:
        """Why the views cannot be trusted to be current, if they cannot: they are
        ``max_lag`` or more events behind, or have not advanced for ``stall_s`` while behind,
        or the last catch-up failed."""
        found = []
        lag = self.lag
        if lag >= max_lag:
            found.append(f"the views are {lag} events behind the log")
        stalled = trio.current_time() - self._progress_at
        if lag > 0 and stalled >= stall_s:
            found.append(f"the views have not advanced for {stalled:.0f} s")
        if self.failing is not None:
            found.append(f"the views cannot be updated: {self.failing}")
        return found

    def _nudge(self, position: int) -> None:
        self._max_known = max(self._max_known, position)
        self._nudged.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follows the log until cancelled.

        Store and views errors are logged and retried with backoff (up to ``max_backoff``
        seconds apart); at start-up they propagate, so a broken store fails the caller of
        ``nursery.start``. An event that cannot be projected is passed over and recorded
        (``Views.apply``), so it never stops the updater; ``problems()`` says when the views
        fall behind.
        """
        self._nudged = trio.Event()
        self._progress_at = trio.current_time()
        self.store.on_saved.append(self._nudge)
        try:
            self.position = await self.views.position()
            self._max_known = max(self._max_known, await self.store.max_position())
            await self.catch_up()
            task_status.started()
            backoff = self.poll_interval
            while True:
                with trio.move_on_after(backoff):
                    await self._nudged.wait()
                with trio.move_on_after(self.settings.projection_delay_ms / 1000):
                    await self.views.wanted.wait()
                self._nudged, self.views.wanted = trio.Event(), trio.Event()
                try:
                    await self.catch_up()
                except (StoreError, ViewStoreError) as exc:
                    backoff = min(self.max_backoff, max(backoff * 2, 0.1))
                    self.failing = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    log.warning("views updater: %s; retrying in %.1f s", exc, backoff)
                else:
                    backoff = self.poll_interval
                    self.failing = None
        finally:
            self.store.on_saved.remove(self._nudge)

    def _observe(self, events: Events) -> None:
        for observer in self.observers:
            observer(events)

    async def catch_up(self) -> int:
        """Projects every notification after the position; returns how many were read."""
        read = 0
        while True:
            notifications = await self.store.select(self.position + 1, self.batch_size)
            if not notifications:
                self._max_known = max(self._max_known, self.position)
                self._progress_at = trio.current_time()
                return read
            read += len(notifications)
            self._max_known = max(self._max_known, notifications[-1].id)
            self.position = await trio.to_thread.run_sync(
                self.views.apply, notifications, self.store.app.mapper, self._observe,
                limiter=self.views.limiter,
            )
            self.views.advanced(self.position)
            self._progress_at = trio.current_time()
            if len(notifications) < self.batch_size:
                # A short read drained the log as it was; look again only when told to.
                self._max_known = max(self._max_known, self.position)
                return read
