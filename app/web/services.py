"""The collaborators of the web layer, wired in one place, and their lifetime.

``Services`` holds the store, views, actor system, views updater, users, limits and
metrics. ``run()`` starts the views updater (which also feeds the response metrics) and
the actor system in a nursery of its own (itself started in the app's lifespan nursery) and
reports started once both are; ``close()`` lets running responses finish for the grace period, then
interrupts them (recorded), cancels the tasks and closes what it opened. Collaborators given
to ``build_services`` are the caller's to close.

A core task that fails once started (the views updater, the actor system and its bus,
the connection watcher) is not restarted and never leaves the server half-alive: the failure
is kept in ``failure``, ``failed`` is set, and the server stops at once and exits with an
error (``server.serve`` raises ``CoreTaskFailedError``) for its supervisor to restart it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from uuid import UUID

import trio

from ..actors.system import ActorSystem
from ..config import Settings
from ..events import wal
from ..events.application import ChatApplication
from ..events.errors import ChatNotFoundError, StoreError
from ..events.store import EventStore
from ..llm import ModelRouter, default_registry
from ..llm.base import Provider
from ..llm.tools import ToolRegistry
from ..projections.search import register_search_tool
from ..projections.updater import ViewUpdater
from ..projections.views import Views, open_views
from ..storage.errors import ViewStoreError
from ..storage.users import UserStore
from ..telemetry import Telemetry
from .budgets import Budgeter
from .limits import MessageLimiter
from .metrics import Metrics, ResponseObserver
from .users import Authenticator

if TYPE_CHECKING:
    from .ws import Connection

log = logging.getLogger(__name__)

#: How long a POST waits for the views to include its write before answering anyway.
READ_YOUR_WRITES_S = 2.0
#: How long a graceful shutdown lets running responses finish before interrupting them.
SHUTDOWN_GRACE_S = 8.0
#: After the grace period (or a second signal), how long the interrupted responses have to be
#: recorded and reach the views; with the listeners' second, the exit stays within 10 s.
ENDINGS_S = 1.0
#: Longest pause of the views updater between two attempts while the store fails: the
#: views (and ``/health``) recover within it once the store is back.
UPDATER_MAX_BACKOFF_S = 1.0


@dataclass
class Services:
    settings: Settings
    store: EventStore
    views: Views
    provider: Provider
    tools: ToolRegistry
    system: ActorSystem
    updater: ViewUpdater
    auth: Authenticator
    metrics: Metrics
    limiter: MessageLimiter
    grace_s: float = SHUTDOWN_GRACE_S
    connections: int = 0
    #: The open WebSocket connections (watched together: see ``ws.watch_connections``).
    sockets: set[Connection] = field(default_factory=set)
    #: Open (or opening) WebSocket connections per user, for their limit.
    sockets_of: Counter[str] = field(default_factory=Counter)
    #: Set once running responses have ended: WebSocket connections close (1001).
    disconnect: trio.Event = field(default_factory=trio.Event)
    owned: list[object] = field(default_factory=list)
    #: The error of the core task that failed, if one did; ``failed`` is set with it.
    failure: BaseException | None = None
    failed: trio.Event = field(default_factory=trio.Event)
    _running: bool = False
    _scope: trio.CancelScope | None = None
    _grace: trio.CancelScope | None = None
    _hurried: bool = False
    _stopped: trio.Event = field(default_factory=trio.Event)
    _drained: bool = False

    @property
    def closing(self) -> trio.Event:
        """Set when the server begins to shut down: connections close, new messages are
        refused (the actor system's signal, the only one)."""
        return self.system.closing

    @property
    def alive(self) -> bool:
        """True while the core tasks run (liveness: no database call)."""
        return self._running and self.failure is None

    async def caught_up(
        self, limit_s: float = READ_YOUR_WRITES_S, chat_id: UUID | None = None
    ) -> bool:
        """Waits (at most ``limit_s``) until the views include every event saved so far, or,
        for ``chat_id`` when this process runs it, every event this process saved (no
        database round trip to learn the log's end)."""
        if chat_id is not None and self.system.owns(chat_id):
            position = self.store.last_saved
        else:
            position = await self.store.max_position()
        return await self.views.wait_for(position, limit_s)

    async def seen_own_writes(self, limit_s: float = READ_YOUR_WRITES_S) -> bool:
        """Waits (at most ``limit_s``) until the views include every event this process has
        saved: a client reads what it wrote through this server (no database round trip
        when they already do)."""
        return await self.views.wait_for(self.store.last_saved, limit_s)

    async def require_chat(self, owner: str, chat_id: UUID) -> None:
        """Raises ``ChatNotFoundError`` unless ``chat_id`` exists and is ``owner``'s, without
        starting its actor (a stranger's chat costs no actor).

        The chat's actor answers when it runs here (no I/O); else the views; the log decides
        when they do not know the chat (yet).
        """
        known = self.system.owner_of(chat_id)
        if known is not None:
            if known != owner:
                raise ChatNotFoundError("chat not found")
            return
        if await self.views.get_chat(owner, chat_id) is not None:
            return
        await self.store.read(chat_owned_by, self.store.app, chat_id, owner)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs the background tasks until ``close()`` (or cancellation). A failure at
        start-up propagates; one after it ends them all and is kept (``fail``)."""
        started = False
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.updater.run)
                    await nursery.start(self.tools.run)  # MCP servers, before any turn
                    await nursery.start(self.system.run)
                    if self.settings.store_kind == "sqlite":
                        data = self.settings.data_dir
                        nursery.start_soon(wal.keep_small, data / "events.sqlite",
                                           data / "views.sqlite")
                    self._running = started = True
                    task_status.started()
        except Exception as exc:
            if not started:
                raise
            self.fail(exc)
        finally:
            self._running = False
            self._stopped.set()

    async def keep(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Runs another core task (the app's connection watcher): its failure is ``fail``'s."""
        try:
            await fn(*args)
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """A core task failed: records why (logged with its traceback) and sets ``failed``."""
        if self.failure is None:
            self.failure = exc
            log.error("a core task failed; the server stops", exc_info=exc)
        self.failed.set()

    async def drain(self) -> None:
        """Refuses new work, lets responses finish for ``grace_s`` (``hurry()`` cuts that
        short), then interrupts them (recorded, text kept). Returns within ``grace_s +
        ENDINGS_S`` (``ENDINGS_S`` after a hurry), whatever the store does."""
        if self._drained:
            return
        self._drained = True
        self.closing.set()
        try:
            with trio.move_on_after(self.grace_s + ENDINGS_S) as budget:
                with trio.CancelScope() as self._grace:
                    if self._hurried:
                        self._grace.cancel()
                    await self.system.shutdown(self.grace_s)
                if self._grace.cancelled_caught:
                    budget.deadline = trio.current_time() + ENDINGS_S
                    await self.system.shutdown(0)
                # the endings reach the views, then the followers
                await self.caught_up(ENDINGS_S)
        except (StoreError, ViewStoreError) as exc:
            log.warning("shutting down: the views could not catch up: %s", exc)
        finally:
            self.disconnect.set()

    def hurry(self) -> None:
        """Cuts the grace period short: running responses are interrupted now (recorded,
        text kept). For a second shutdown signal."""
        self._hurried = True
        if self._grace is not None:
            self._grace.cancel()

    async def close(self) -> None:
        """Drains (unless a core task failed: the store may be what failed), stops the
        background tasks and closes what ``build_services`` opened."""
        try:
            if self._scope is not None:
                if self.failure is None:
                    await self.drain()
                else:
                    self.closing.set()
                    self.disconnect.set()
                self._scope.cancel()
                await self._stopped.wait()
        finally:
            with trio.CancelScope(shield=True):
                for resource in reversed(self.owned):
                    await _close(resource)


def chat_owned_by(app: ChatApplication, chat_id: UUID, owner: str) -> None:
    """Blocking: raises ``ChatNotFoundError`` unless the chat's first event names ``owner``
    (``ChatDeletedError`` once it was deleted, here or by another process)."""
    app.keys.forget(chat_id)  # what this process knows of its key may be stale
    first = list(app.events.get(chat_id, lte=1))
    if not first or getattr(first[0], "owner", None) != owner:
        raise ChatNotFoundError("chat not found")


async def _close(resource: object) -> None:
    try:
        if isinstance(resource, EventStore | Views):
            await trio.to_thread.run_sync(resource.close)
        else:
            await resource.aclose()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - closing must go on with the others
        log.warning("closing %s failed: %s", type(resource).__name__, exc)


async def build_services(
    settings: Settings,
    *,
    store: EventStore | None = None,
    views: Views | None = None,
    provider: Provider | None = None,
    tools: ToolRegistry | None = None,
    users: UserStore | None = None,
    grace_s: float = SHUTDOWN_GRACE_S,
    telemetry: Telemetry | None = None,
) -> Services:
    """Opens what is not given (blocking parts in worker threads) and wires it all;
    ``telemetry`` (else the OTLP exporter that the settings name, if any) traces the turns."""
    owned: list[object] = []
    if store is None:
        store = await trio.to_thread.run_sync(EventStore.open, settings)
        owned.append(store)
    if views is None:
        views = await trio.to_thread.run_sync(open_views, settings)
        owned.append(views)
    if provider is None:
        provider = ModelRouter.build(settings)
        owned.append(provider)
    if tools is None:
        tools = default_registry(settings)
        register_search_tool(tools, views)
    if telemetry is None:
        telemetry = await trio.to_thread.run_sync(Telemetry.from_settings, settings)
        if telemetry is not None:
            owned.append(telemetry)
    if telemetry is not None:
        provider = telemetry.instrument(provider, tools)
    system = ActorSystem(settings, store, provider, tools, telemetry)
    metrics = Metrics((settings.model, provider.default_model, *settings.metrics_models))
    updater = ViewUpdater(settings, store, views, max_backoff=UPDATER_MAX_BACKOFF_S)
    updater.observers.append(ResponseObserver(metrics))
    services = Services(
        settings=settings, store=store, views=views, provider=provider, tools=tools,
        system=system, updater=updater,
        auth=Authenticator(users or UserStore(settings)), metrics=metrics,
        limiter=MessageLimiter(settings.messages_per_minute, settings.concurrent_responses,
                               system.generating_for, chats_per_hour=settings.chats_per_hour,
                               budgeter=Budgeter(settings.budgets, views, store.max_position)
                               if settings.budgets.limited else None),
        grace_s=grace_s, owned=owned,
    )
    _register_gauges(services)
    return services


def _register_gauges(s: Services) -> None:
    m = s.metrics
    m.gauge("eventchat_websocket_connections", "Open WebSocket connections",
            lambda: s.connections)
    m.gauge("eventchat_active_chats", "Chats with a running actor",
            lambda: s.system.counts()["active_chats"])
    m.gauge("eventchat_generating_responses", "Responses being generated",
            lambda: s.system.counts()["generating"])
    m.gauge("eventchat_mailbox_depth", "Commands waiting in actor mailboxes",
            lambda: s.system.counts()["queue_depth"])
    m.gauge("eventchat_chat_subscriptions",
            "Open subscriptions to chats (WebSocket follows, SSE follows and streams)",
            lambda: s.system.hub.count())
    m.gauge("eventchat_projection_lag", "Events not yet in the views", lambda: s.updater.lag)
    m.gauge("eventchat_projection_position", "Log position the views include",
            lambda: s.updater.position)
    m.gauge("eventchat_projection_skipped_events",
            "Events this process could not project and passed over (see projections status)",
            lambda: s.views.skipped)
