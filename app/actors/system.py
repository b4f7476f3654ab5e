"""The actor system: finds, starts, supervises and passivates one ``SessionActor`` per chat.

Actors live in the system's nursery (``await nursery.start(system.run)``). A command for a
chat goes to its actor's bounded mailbox, starting the actor (loaded from the log) if it is
not running. A crashed actor is restarted from the log with exponential backoff; the crash is
logged, counted, and if a response was open it is recorded as interrupted. At start-up the
system resumes every chat left with an open response or an unanswered message.

On SQLite the data directory is claimed with an exclusive file lock: one process owns its
chats, so a response left open at start-up was necessarily left by a dead process.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any
from uuid import UUID

import trio

from ..config import Settings
from ..events.application import UnfinishedChats
from ..events.domain import ChatSession
from ..events.errors import ChatNotFoundError, EventsError, StoreError
from ..events.store import EventStore
from ..llm.base import Provider
from ..llm.tools import ToolRegistry
from .cluster import Bus, LocalLeases, PostgresLeases
from .errors import ActorError, ActorStoppedError, MailboxFullError
from .hub import Hub, Subscription
from .messages import Accepted, Admission, Attach, Command, SendMessage, StopGeneration, TokenDelta
from .session import SessionActor

log = logging.getLogger(__name__)

#: How long a command may wait for room in a full mailbox before it is refused.
MAILBOX_WAIT_S = 5.0
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 5.0
#: Items from other processes waiting to be applied before new ones are dropped.
BUS_BACKLOG = 10_000


class DataDirLockedError(StoreError):
    code = "data_dir_locked"


def claim_data_dir(data_dir: Path) -> IO[str]:
    """Takes the data directory's exclusive lock (held while the returned file is open)."""
    path = data_dir / "eventchat.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the system's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirLockedError(
            f"another eventchat process is using {data_dir}; "
            "use PostgreSQL (EVENTCHAT_DATABASE_URL) to run several processes"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


class ActorSystem:
    def __init__(
        self, settings: Settings, store: EventStore, provider: Provider, tools: ToolRegistry
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.tools = tools
        self.hub = Hub(settings.subscriber_queue_size)
        self.restarts = 0
        self._actors: dict[UUID, SessionActor] = {}
        self._generating: Counter[str] = Counter()
        self._idle = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._lock_file: IO[str] | None = None
        self.leases: LocalLeases | PostgresLeases = LocalLeases()
        self.bus: Bus | None = None
        if settings.store_kind == "postgres":
            self.leases = PostgresLeases(settings)
            self.bus = Bus(settings, self._from_others)
        self._from_bus, self._bus_items = trio.open_memory_channel[dict[str, Any]](BUS_BACKLOG)
        #: Text streamed by responses running in other processes (response id, offset, text).
        self._remote: dict[UUID, tuple[str, int, str]] = {}
        self._unfinished = UnfinishedChats(store.app)

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled; resumes unfinished chats before reporting started."""
        if self.settings.store_kind == "sqlite":
            self._claim_data_dir()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.bus is not None:
                    await nursery.start(self.bus.run)
                    nursery.start_soon(self._feed_from_others)
                await self._resume_unfinished()
                if self.bus is not None:
                    nursery.start_soon(self._resume_periodically)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.leases.close()
            if self._lock_file is not None:
                self._lock_file.close()

    async def _resume_unfinished(self) -> None:
        """Starts the actors of chats left with an open response or an unanswered message."""
        for chat_id in await self.store.run(self._unfinished.scan):
            if self._nursery is not None:
                self._actor_for(chat_id)

    async def _resume_periodically(self) -> None:
        """Several processes: takes over the unfinished chats of a process that died."""
        while True:
            await trio.sleep(self.settings.recovery_interval_s)
            try:
                await self._resume_unfinished()
            except StoreError as exc:
                log.warning("could not look for unfinished chats: %s", exc)

    def _claim_data_dir(self) -> None:
        self._lock_file = claim_data_dir(self.settings.data_dir)

    async def shutdown(self, grace_s: float) -> None:
        """Refuses new messages, lets running responses finish for up to ``grace_s``, then
        ends the rest as interrupted (recorded, text kept)."""
        self._closing = True
        with trio.move_on_after(grace_s):
            while sum(self._generating.values()) > 0:
                await self._idle.wait()
        for actor in list(self._actors.values()):
            actor.interrupt("server_shutdown")
        with trio.move_on_after(max(1.0, grace_s)):
            while sum(self._generating.values()) > 0:
                await self._idle.wait()

    # -- commands -----------------------------------------------------------------------

    async def create_chat(
        self,
        owner: str,
        title: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
    ) -> UUID:
        chat = ChatSession.start(owner, title or "New chat", model, system_prompt)
        await self.store.save(chat)
        return chat.id

    async def send_message(
        self,
        chat_id: UUID,
        owner: str,
        text: str,
        client_message_id: str | None = None,
        admit: Admission | None = None,
    ) -> Accepted:
        """Returns once the message is durable. Raises ``ChatNotFoundError`` (missing or not
        ``owner``'s), a ``ChatRuleError``, ``StoreError``, ``MailboxFullError``, or what
        ``admit`` raised. A re-sent ``client_message_id`` returns the first ``Accepted``
        (``duplicate=True``) without calling ``admit``."""
        if self._closing:
            raise ActorStoppedError("the server is shutting down")
        return await self._ask(chat_id, SendMessage(owner, text, client_message_id, admit))

    async def stop_generation(self, chat_id: UUID, owner: str) -> bool:
        """Stops the running response of the chat; False if none was running."""
        return await self._ask(chat_id, StopGeneration(owner))

    @asynccontextmanager
    async def subscribe(self, chat_id: UUID, owner: str) -> AsyncIterator[Subscription]:
        """Follows a chat: stored events and live token deltas, from now on.

        ``subscription.state`` says what was already published when it started (taken in the
        same step as the registration, so nothing falls between the two).
        """
        while True:
            await self._ask(chat_id, Attach(owner))
            actor = self._actors.get(chat_id)
            if actor is not None:  # else it passivated in between: attach to its successor
                break
        subscription = self.hub.open(chat_id, actor.live_state())
        try:
            yield subscription
        finally:
            self.hub.close(subscription)

    # -- queries ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {
            "active_chats": len(self._actors),
            "generating": sum(self._generating.values()),
            "queue_depth": sum(
                a.mailbox.statistics().current_buffer_used for a in self._actors.values()
            ),
        }

    def owns(self, chat_id: UUID) -> bool:
        """True if this process runs the chat's responses (and so saves its events)."""
        actor = self._actors.get(chat_id)
        return actor is not None and actor.owns

    def generating_for(self, owner: str) -> int:
        return self._generating[owner]

    def generating_changed(self, owner: str, delta: int) -> None:
        self._generating[owner] += delta
        if self._generating[owner] <= 0:
            del self._generating[owner]
        if not self._generating:
            self._idle.set()
            self._idle = trio.Event()

    # -- actors -------------------------------------------------------------------------

    async def _ask(self, chat_id: UUID, command: Command) -> Any:
        while True:
            actor = self._actor_for(chat_id)
            try:
                with trio.fail_after(MAILBOX_WAIT_S):
                    await actor.mailbox.send(command)
            except trio.TooSlowError:
                raise MailboxFullError("this chat has too many messages waiting") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue  # the actor passivated meanwhile: the next one takes it
            return await command.reply.wait()

    def _actor_for(self, chat_id: UUID) -> SessionActor:
        actor = self._actors.get(chat_id)
        if actor is None:
            if self._nursery is None:
                raise ActorStoppedError("the actor system is not running")
            actor = SessionActor(self, chat_id)
            self._actors[chat_id] = actor
            self._nursery.start_soon(self._supervise, actor)
        return actor

    async def _supervise(self, actor: SessionActor) -> None:
        reason, backoff = "server_restarted", BACKOFF_START_S
        try:
            while True:
                try:
                    await actor.run(recovery_reason=reason)
                    return
                except ChatNotFoundError as exc:
                    actor.fail_waiting(exc)
                    return
                except Exception as exc:  # noqa: BLE001 - a crash: log it and restart
                    self.restarts += 1
                    log.error(
                        "actor for chat %s crashed; restarting from the log",
                        actor.chat_id,
                        exc_info=exc,
                    )
                    reason = "actor_restarted"
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            if self._actors.get(actor.chat_id) is actor:
                del self._actors[actor.chat_id]
            for command in actor.drain():
                self._redeliver(actor.chat_id, command)
            if actor.owns:
                with trio.move_on_after(2, shield=True):
                    try:
                        await self.leases.release(actor.chat_id)
                    except StoreError as exc:
                        log.warning("could not release the lease of %s: %s", actor.chat_id, exc)

    # -- other processes ----------------------------------------------------------------

    def tell_others(self, **item: Any) -> None:
        if self.bus is not None:
            self.bus.send(**item)

    def _from_others(self, item: dict[str, Any]) -> None:
        try:
            self._from_bus.send_nowait(item)
        except trio.WouldBlock:
            log.warning("bus backlog full: a live item from another process was dropped")

    async def _feed_from_others(self) -> None:
        """Applies other processes' items in arrival order: stops, wake-ups, live frames."""
        async for item in self._bus_items:
            chat_id = UUID(item["c"])
            actor = self._actors.get(chat_id)
            kind = item["k"]
            if kind == "x" and actor is not None and actor.owns:
                actor.stop_here()
            elif kind == "e":
                if actor is not None and actor.owns:
                    actor.refresh_soon()
                if self.hub.count(chat_id):
                    await self._publish_stored(chat_id, item["a"], item["b"])
            elif kind == "d":
                self._mirror(chat_id, item["r"], item["o"], item["t"])
                if self.hub.count(chat_id):
                    self.hub.publish(chat_id, TokenDelta(chat_id, item["r"], item["t"], item["o"]))
            elif kind == "z":
                self._remote.pop(chat_id, None)

    async def _publish_stored(self, chat_id: UUID, first: int, last: int) -> None:
        def fetch() -> list[Any]:
            return list(self.store.app.events.get(chat_id, gt=first - 1, lte=last))

        try:
            events = await self.store.run(fetch)
        except StoreError as exc:
            log.warning("could not read events %s..%s of chat %s: %s", first, last, chat_id, exc)
            return
        for event in events:
            self.hub.publish(chat_id, event)

    def _mirror(self, chat_id: UUID, response_id: str, offset: int, text: str) -> None:
        known = self._remote.get(chat_id)
        if known is not None and known[0] == response_id and known[1] + len(known[2]) == offset:
            self._remote[chat_id] = (response_id, known[1], known[2] + text)
        else:
            self._remote[chat_id] = (response_id, offset, text)

    def remote_text(self, chat_id: UUID, response_id: str, persisted: str) -> str:
        """The text so far of a response running in another process: what it persisted,
        completed by the deltas this process saw, when the two join up."""
        known = self._remote.get(chat_id)
        if known is None or known[0] != response_id or known[1] > len(persisted):
            return persisted
        _, start, seen = known
        return persisted[:start] + seen if start + len(seen) >= len(persisted) else persisted

    def _redeliver(self, chat_id: UUID, command: Command) -> None:
        """Hands a command left in a passivated actor's mailbox to its successor."""
        if self._nursery is None or self._nursery.cancel_scope.cancel_called:
            command.reply.fail(ActorStoppedError("the actor system stopped"))
            return

        async def forward() -> None:
            try:
                await self._ask(chat_id, command)
            except (EventsError, ActorError) as exc:
                command.reply.fail(exc)

        self._nursery.start_soon(forward)
