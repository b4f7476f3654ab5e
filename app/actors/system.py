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
from typing import IO, Any
from uuid import UUID

import trio

from ..config import Settings
from ..events.domain import ChatSession
from ..events.errors import ChatNotFoundError, EventsError, StoreError
from ..events.store import EventStore
from ..llm.base import Provider
from ..llm.tools import ToolRegistry
from .errors import ActorError, ActorStoppedError, MailboxFullError
from .hub import Hub, Subscription
from .messages import Accepted, Attach, Command, SendMessage, StopGeneration
from .session import SessionActor

log = logging.getLogger(__name__)

#: How long a command may wait for room in a full mailbox before it is refused.
MAILBOX_WAIT_S = 5.0
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 5.0


class DataDirLockedError(StoreError):
    code = "data_dir_locked"


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

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled; resumes unfinished chats before reporting started."""
        if self.settings.store_kind == "sqlite":
            self._claim_data_dir()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for chat_id in await self.store.run(self.store.app.unfinished_chats):
                    self._actor_for(chat_id)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            if self._lock_file is not None:
                self._lock_file.close()

    def _claim_data_dir(self) -> None:
        path = self.settings.data_dir / "eventchat.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 - held for the system's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DataDirLockedError(
                f"another eventchat process is using {self.settings.data_dir}; "
                "use PostgreSQL (EVENTCHAT_DATABASE_URL) to run several processes"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

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
        self, chat_id: UUID, owner: str, text: str, client_message_id: str | None = None
    ) -> Accepted:
        """Returns once the message is durable. Raises ``ChatNotFoundError`` (missing or not
        ``owner``'s), a ``ChatRuleError``, ``StoreError`` or ``MailboxFullError``."""
        if self._closing:
            raise ActorStoppedError("the server is shutting down")
        return await self._ask(chat_id, SendMessage(owner, text, client_message_id))

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
            "queue_depth": sum(a.mailbox.statistics().current_buffer_used for a in self._actors.values()),
        }

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
                    log.error("actor for chat %s crashed; restarting from the log",
                              actor.chat_id, exc_info=exc)
                    reason = "actor_restarted"
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            if self._actors.get(actor.chat_id) is actor:
                del self._actors[actor.chat_id]
            for command in actor.drain():
                self._redeliver(actor.chat_id, command)

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
