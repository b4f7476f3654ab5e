"""The actor system: finds, starts, supervises and passivates one ``SessionActor`` per chat.

Actors live in the system's nursery (``await nursery.start(system.run)``). A command for a
chat goes to its actor's bounded mailbox, starting the actor (loaded from the log) if it is
not running. A crashed actor is restarted from the log with exponential backoff; the crash is
logged, counted, and if a response was open it is recorded as interrupted. At start-up the
system resumes every chat left with an open response or an unanswered message.

On SQLite the data directory is claimed with an exclusive file lock: one process owns its
chats, so a response left open at start-up was necessarily left by a dead process.

On PostgreSQL the system's ``Cluster`` also runs the bus and watches the lease connection.
When leases are lost, their actors stop writing at once and start again (as followers until
they get the lease back, here or elsewhere); when items from other processes were lost, every
actor reloads and the followers of each chat get the events they missed from the log.
``problems()`` says what is degraded meanwhile. An actor is given an ``ActorContext`` (the
store, the model, the tools, the hub, the cluster and two callbacks), never the system.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, overload
from uuid import UUID

import trio

from ..config import Settings
from ..events.application import UnfinishedChats
from ..events.domain import ChatSession
from ..events.errors import ChatNotFoundError, EventsError, StoreError, StoreUnavailableError
from ..events.fork import chat_at
from ..events.store import EventStore
from ..llm.base import Provider
from ..llm.tools import ToolRegistry
from ..telemetry import Telemetry
from .cluster import Cluster
from .errors import ActorError, ActorStoppedError, MailboxFullError
from .hub import Hub, Subscription
from .messages import (
    Accepted,
    Admission,
    Attach,
    Command,
    DecideTool,
    SendMessage,
    StopGeneration,
)
from .session import ActorContext, SessionActor

log = logging.getLogger(__name__)

#: How long a command may wait for room in a full mailbox before it is refused.
MAILBOX_WAIT_S = 5.0
#: How long a deletion waits for the chat's running response to stop before going on.
STOP_BEFORE_DELETE_S = 10.0
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 5.0


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
        self, settings: Settings, store: EventStore, provider: Provider, tools: ToolRegistry,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.tools = tools
        self.hub = Hub(settings.subscriber_queue_size)
        self.restarts = 0
        self._actors: dict[UUID, SessionActor] = {}
        #: The cancel scope of each running actor's ``run()``: a deleted chat's is cancelled.
        self._runs: dict[UUID, trio.CancelScope] = {}
        self._generating: Counter[str] = Counter()
        self._idle = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: Set when the server begins to shut down: new messages are refused (the one
        #: shutdown signal: the web layer reads it too).
        self.closing = trio.Event()
        self._lock_file: IO[str] | None = None
        #: The other processes sharing the database: leases, bus, remote text, takeover.
        self.cluster = Cluster(settings, store, self.hub, self._actors, self._resume_unfinished)
        #: What every actor of this system is given.
        self.context = ActorContext(
            settings, store, provider, tools, self.hub, self.cluster, self.redeliver,
            self.generating_changed, telemetry,
        )
        self._unfinished = UnfinishedChats(store.app)

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled; resumes unfinished chats before reporting started."""
        if self.settings.store_kind == "sqlite":
            self._claim_data_dir()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.cluster.run)
                await self._resume_unfinished()
                nursery.start_soon(self.cluster.take_over)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.cluster.close()
            if self._lock_file is not None:
                self._lock_file.close()

    async def _resume_unfinished(self) -> None:
        """Starts the actors of chats left with an open response or an unanswered message."""
        for chat_id in await self.store.run(self._unfinished.scan):
            if self._nursery is not None:
                self._actor_for(chat_id)

    def _claim_data_dir(self) -> None:
        self._lock_file = claim_data_dir(self.settings.data_dir)

    async def shutdown(self, grace_s: float) -> None:
        """Refuses new messages, lets running responses finish for up to ``grace_s``, then
        ends the rest as interrupted (recorded, text kept)."""
        self.closing.set()
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
        max_tokens: int | None = None,
    ) -> UUID:
        chat = ChatSession.start(owner, title or "New chat", model, system_prompt,
                                 max_tokens=max_tokens)
        await self.store.save(chat)
        return chat.id

    async def open_chat(self, owner: str) -> UUID:
        """Creates a chat whose first message follows at once: its actor starts from the
        new chat in memory (no log read) and the chat's first follower joins it without a
        mailbox round trip."""
        chat = ChatSession.start(owner)
        await self.store.save(chat)
        if self._nursery is not None and chat.id not in self._actors:
            self._start(SessionActor(self.context, chat.id, chat))
        return chat.id

    async def send_message(
        self,
        chat_id: UUID,
        owner: str,
        text: str,
        client_message_id: str | None = None,
        admission: Admission | None = None,
        model: str | None = None,
        *,
        edit_of: int | None = None,
        regenerate: bool = False,
        reply_seq: int | None = None,
    ) -> Accepted:
        """Returns once the message is durable (to be answered by ``model``, else the
        chat's): a new message on the active branch, an edit of user message ``edit_of``,
        or (``regenerate``, ``text`` unused) a new answer to the message of reply
        ``reply_seq``. Raises ``ChatNotFoundError`` (missing or not ``owner``'s), a
        ``ChatRuleError``, ``StoreError``, ``MailboxFullError``, or what
        ``admission.admit()`` raised. A re-sent ``client_message_id`` returns the first
        ``Accepted`` (``duplicate=True``) without admitting it."""
        if self.closing.is_set():
            raise ActorStoppedError("the server is shutting down")
        return await self.ask(chat_id, SendMessage(owner, text, client_message_id, admission,
                                                   model=model, edit_of=edit_of,
                                                   regenerate=regenerate, reply_seq=reply_seq))

    async def select_branch(self, chat_id: UUID, owner: str, seq: int) -> None:
        """Makes the branch through message ``seq`` the active one, through the chat's
        actor (recorded and published as its own events are). Raises what
        ``change_chat`` raises (``ResponseInProgressError`` while anything is answered)."""
        def select(chat: ChatSession) -> None:
            chat.select_branch(seq)

        await self.change_chat(chat_id, owner, select)

    async def fork_chat(self, chat_id: UUID, owner: str, at_seq: int,
                        title: str | None = None) -> UUID:
        """A new chat of ``owner`` holding ``chat_id``'s active branch as it was right after
        event ``at_seq`` (``Forked`` names the chat, the seq and its chain hash). Raises
        ``ChatNotFoundError``, ``ChatRuleError`` (no such seq) or ``StoreError``."""
        source, digest = await self.store.read(chat_at, self.store.app, chat_id, owner, at_seq)
        chat = ChatSession.start(owner, title or source.title, source.model,
                                 source.system_prompt, max_tokens=source.max_tokens)
        chat.fork_from(source, digest)
        await self.store.save(chat)
        return chat.id

    async def stop_generation(self, chat_id: UUID, owner: str) -> bool:
        """Stops the running response of the chat; False if none was running."""
        return await self.ask(chat_id, StopGeneration(owner))

    async def decide_tool(self, chat_id: UUID, owner: str, call_id: str, approve: bool,
                          reason: str | None = None) -> int:
        """Records ``owner``'s decision on the tool call ``call_id``, which waits for one;
        returns its seq. Raises ``ChatNotFoundError``, ``ToolCallNotFoundError`` (no such
        call waits), ``AlreadyDecidedError`` (the first decision won) or ``StoreError``."""
        return await self.ask(chat_id, DecideTool(owner, call_id, approve, reason))

    async def change_chat(
        self, chat_id: UUID, owner: str, change: Callable[[ChatSession], None]
    ) -> None:
        """Records ``change``'s events (a rename, a model, a system prompt) through the chat's
        actor, as the actor records its own: under its lock, with its fence, published to
        its followers. Raises ``ChatNotFoundError`` (missing, deleted or not ``owner``'s), a
        ``ChatRuleError`` (nothing recorded) or ``StoreError``."""
        actor = await self._attached(chat_id, owner)
        await actor.record(change)

    async def delete_chat(self, chat_id: UUID, owner: str) -> None:
        """Deletes the chat: stops its running response (waiting for it to end, at most
        ``STOP_BEFORE_DELETE_S``), records ``Deleted`` (who, when), destroys its key, and
        ends its actor; a command waiting for it gets ``ChatNotFoundError``. Raises
        ``ChatNotFoundError`` (missing, already deleted or not ``owner``'s) or ``StoreError``;
        a deletion whose key could not be destroyed is completed by the next call."""
        actor = await self._attached(chat_id, owner)
        try:
            if not actor.chat.deleted:
                await self._stop_for_deletion(actor, owner)
                await actor.record(lambda chat: chat.delete(owner))
            await self.store.destroy_key(chat_id)
        finally:
            if actor.chat.deleted:
                self._retire(chat_id)

    async def _attached(self, chat_id: UUID, owner: str) -> SessionActor:
        """The chat's actor, loaded, once the chat is known to be ``owner``'s."""
        while True:
            actor = self._actor_for(chat_id)
            if not actor.up_to_date:
                await self.ask(chat_id, Attach(owner))
                found = self._actors.get(chat_id)
                if found is None:  # it passivated in between: ask its successor
                    continue
                actor = found
            actor.check_owner(owner)
            return actor

    async def _stop_for_deletion(self, actor: SessionActor, owner: str) -> None:
        with trio.move_on_after(STOP_BEFORE_DELETE_S):
            while actor.turn is not None or actor.chat.current is not None:
                await self.stop_generation(actor.chat_id, owner)
                await trio.sleep(0.02)

    def _retire(self, chat_id: UUID) -> None:
        """Ends the actor of a deleted chat at once (it answers no one any more)."""
        actor = self._actors.pop(chat_id, None)
        scope = self._runs.get(chat_id)
        if actor is not None and scope is not None:
            scope.cancel()

    @asynccontextmanager
    async def subscribe(self, chat_id: UUID, owner: str) -> AsyncIterator[Subscription]:
        """Follows a chat: stored events and live token deltas, from now on.

        ``subscription.state`` says what was already published when it started (taken in the
        same step as the registration, so nothing falls between the two). Raises
        ``ChatNotFoundError`` (missing, or not ``owner``'s). An actor whose chat in memory is
        the stored one (it owns the chat, or has just created it) is not asked: no mailbox
        round trip.
        """
        while True:
            actor = self._actor_for(chat_id)
            if actor.up_to_date:  # its chat is the stored one: no need to ask it
                actor.check_owner(owner)
                break
            await self.ask(chat_id, Attach(owner))
            found = self._actors.get(chat_id)
            if found is not None:  # else it passivated in between: attach to its successor
                actor = found
                break
        subscription = self.hub.open(chat_id, actor.live_state())
        self.cluster.joined(chat_id, subscription.state)
        try:
            yield subscription
        finally:
            self.hub.close(subscription)
            if not self.hub.count(chat_id):
                self.cluster.left(chat_id)

    # -- queries ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {
            "active_chats": len(self._actors),
            "generating": sum(self._generating.values()),
            "queue_depth": sum(
                a.mailbox.statistics().current_buffer_used for a in self._actors.values()
            ),
        }

    def problems(self) -> list[str]:
        """What is degraded now (a lost connection to PostgreSQL being made again), for
        operators; empty when all is well."""
        return self.cluster.problems()

    def owner_of(self, chat_id: UUID) -> str | None:
        """The chat's owner as its running actor holds it, or None if no actor has it in
        memory here (the owner of a chat never changes: no I/O needed)."""
        actor = self._actors.get(chat_id)
        if actor is None or not actor.loaded or actor.chat.deleted:
            return None
        return actor.chat.owner

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

    @overload
    async def ask(self, chat_id: UUID, command: SendMessage) -> Accepted: ...
    @overload
    async def ask(self, chat_id: UUID, command: StopGeneration) -> bool: ...
    @overload
    async def ask(self, chat_id: UUID, command: DecideTool) -> int: ...
    @overload
    async def ask(self, chat_id: UUID, command: Command) -> Accepted | bool | int | None: ...

    async def ask(self, chat_id: UUID, command: Command) -> Accepted | bool | int | None:
        """Puts ``command`` in the chat's mailbox (starting its actor if needed) and waits
        for the reply: the one way a command reaches an actor, one mailbox round trip.
        Raises ``MailboxFullError`` if the mailbox stays full for ``MAILBOX_WAIT_S``."""
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
            actor = self._start(SessionActor(self.context, chat_id))
        return actor

    def _start(self, actor: SessionActor) -> SessionActor:
        assert self._nursery is not None
        self._actors[actor.chat_id] = actor
        self._nursery.start_soon(self._supervise, actor)
        return actor

    async def _supervise(
        self, actor: SessionActor, reason: str = "server_restarted",
        backoff: float = BACKOFF_START_S,
    ) -> None:
        """Runs ``actor`` until it passivates. A crash restarts it from the log with backoff
        (``actor_restarted``); a lost lease too, its abandoned response then being ended as
        ``owner_lost`` by whichever process takes the chat. A crash because the store could
        not be used answers the commands waiting for the actor at once (``_restart_later``)."""
        run = trio.CancelScope()
        try:
            while True:
                try:
                    with trio.CancelScope() as run:
                        self._runs[actor.chat_id] = run
                        await actor.run(recovery_reason=reason)
                    if run.cancelled_caught or not actor.lease_lost:
                        return  # passivated, or its chat was deleted (``_retire``)
                    reason = "owner_lost"
                    await self.cluster.release(actor.chat_id)  # if its lock outlived the fence
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                except ChatNotFoundError as exc:
                    actor.fail_waiting(exc)
                    return
                except Exception as exc:  # noqa: BLE001 - a crash: log it and restart
                    self.restarts += 1
                    outage = store_outage(exc)
                    if outage is not None:
                        self._restart_later(actor, outage, backoff)
                        return
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
            if self._runs.get(actor.chat_id) is run:
                del self._runs[actor.chat_id]
            for command in actor.drain():
                self.redeliver(actor.chat_id, command)
            if actor.owns:
                await self.cluster.release(actor.chat_id)

    def _restart_later(
        self, actor: SessionActor, outage: StoreUnavailableError, backoff: float
    ) -> None:
        """The store failed under ``actor`` (while it loaded, or later): the commands waiting
        for it are answered with ``outage`` now, and the actor is let go, so that the next
        command starts a fresh one at once. After ``backoff``, a fresh actor is started
        anyway if none was (a response left open is then ended, and waiting messages
        answered, as soon as the store is back)."""
        chat_id = actor.chat_id
        log.warning("actor for chat %s cannot use the store (%s); trying again in %.2f s",
                    chat_id, outage, backoff)
        actor.fail_waiting(outage)

        async def retry() -> None:
            await trio.sleep(backoff)
            if chat_id in self._actors or self._nursery is None or self.closing.is_set():
                return
            fresh = self._actors[chat_id] = SessionActor(self.context, chat_id)
            await self._supervise(fresh, "actor_restarted", min(backoff * 2, BACKOFF_MAX_S))

        if self._nursery is not None:
            self._nursery.start_soon(retry)

    def redeliver(self, chat_id: UUID, command: Command) -> None:
        """Hands a command left in a passivated actor's mailbox (or one an actor could not
        carry out: its lease was lost) to its successor, or the actor started again."""
        if self._nursery is None or self._nursery.cancel_scope.cancel_called:
            command.reply.fail(ActorStoppedError("the actor system stopped"))
            return

        async def forward() -> None:
            try:
                await self.ask(chat_id, command)
            except (EventsError, ActorError) as exc:
                command.reply.fail(exc)

        self._nursery.start_soon(forward)


def store_outage(exc: BaseException) -> StoreUnavailableError | None:
    """The store failure behind a crash (in an exception group, or as a cause), if any."""
    if isinstance(exc, StoreUnavailableError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := store_outage(inner)) is not None:
                return found
    return None if exc.__cause__ is None else store_outage(exc.__cause__)
