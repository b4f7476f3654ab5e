"""The actor that owns one chat: its aggregate, its mailbox and its running response.

A ``SessionActor`` runs two tasks: the *receiver* takes commands from the bounded mailbox
(records user messages and acknowledges them once durable, stops responses), and the
*generator* answers waiting user messages one at a time, in arrival order. Every change to
the chat goes through ``record()``: one lock, one transaction, then the new events are
published to the chat's subscribers. If a save fails, the aggregate is reloaded from the log
so memory never runs ahead of the store. An actor idle for ``passivate_after_s`` returns
from ``run()``; any other exception is a crash for the supervisor to restart from the log.

The owner's saves carry its lease's fence. When the lease is lost (its connection failed, or
a save was fenced) the actor writes nothing more: its running turn is abandoned (the model
call closed, nothing recorded), ``run()`` returns with ``lease_lost`` set, and the supervisor
starts it again, which takes the lease back if it is free or follows the new owner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar
from uuid import UUID, uuid4

import trio

from ..config import Settings
from ..events.application import Fence
from ..events.domain import ChatSession
from ..events.errors import (
    ChatNotFoundError,
    ChatRuleError,
    ConcurrencyError,
    DuplicateMessageError,
    EventsError,
    FencedError,
    StoreError,
    StoreUnavailableError,
)
from ..events.store import EventStore
from ..llm.base import Provider
from ..llm.router import for_model, upstream_name
from ..llm.tools import ToolRegistry
from ..telemetry import Telemetry, turn_span
from .cluster import Cluster, Lease
from .errors import ActorCrashedError, ActorStoppedError
from .hub import Hub
from .messages import (
    Accepted,
    ApprovalWait,
    Attach,
    Command,
    DecideTool,
    LiveResponse,
    LiveState,
    SendMessage,
    StopGeneration,
    TokenDelta,
)
from .turn import Mutation, Turn, TurnPorts
from .wire import Delta, Ended, Saved, StopAsked

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds between two attempts of a follower to take over a chat's lease.
LEASE_RETRY_S = 2.0
#: Saves tried again after another process wrote the chat first.
CONFLICT_RETRIES = 5


@dataclass(frozen=True, slots=True)
class ActorContext:
    """What the actors of one system share, and all that an actor may use of it."""

    settings: Settings
    store: EventStore
    provider: Provider
    tools: ToolRegistry
    #: This process's followers of each chat.
    hub: Hub
    #: The other processes: leases, the bus, the text of responses running there.
    cluster: Cluster
    #: Hands a command this actor could not carry out to its successor.
    redeliver: Callable[[UUID, Command], None]
    #: Counts the responses generating for a user (``+1`` / ``-1``).
    generating_changed: Callable[[str, int], None]
    #: Traces each turn (``app.telemetry``); None: off.
    telemetry: Telemetry | None = None


class SessionActor:
    def __init__(
        self, context: ActorContext, chat_id: UUID, chat: ChatSession | None = None
    ) -> None:
        self.context = context
        self.settings = context.settings
        self.store = context.store
        self.provider = context.provider
        self.tools = context.tools
        self.chat_id = chat_id
        self.mailbox, self._inbox = trio.open_memory_channel[Command](self.settings.mailbox_size)
        #: A chat just created here starts from memory (no log read): ``fresh`` until the
        #: actor knows whether it holds the lease.
        self._seed = chat
        self.fresh = self._loaded = chat is not None
        if chat is not None:
            self.chat = chat
        self.turn: Turn | None = None
        self.published_seq = chat.version if chat is not None else 0
        self._lock = trio.Lock()
        self._work = trio.Event()
        self._stale = False
        #: The response started with a message whose transaction is still committing.
        self._early: str | None = None
        #: Held when this process holds the chat's lease and so runs its responses; a
        #: follower only records messages (the owner picks them up from the log) and
        #: forwards stops, and takes over if the owner goes away.
        self.lease: Lease | None = None
        #: The lease was lost during the last ``run()``: nothing more was written.
        self.lease_lost = False
        self._scope = trio.CancelScope()
        #: A save is in flight: the chat in memory holds its events, the log not yet.
        self._saving = False
        #: A save failed because the store is unavailable: the actor is stopping.
        self._outage: StoreUnavailableError | None = None
        #: The response in progress as its followers were shown it before that save.
        self._shown: LiveResponse | None = None
        #: What this actor's turns may use (``record`` among them).
        self.turn_ports = TurnPorts(
            chat_id, lambda: self.chat, self.record, self.provider, self.tools, self.settings,
        )

    @property
    def owns(self) -> bool:
        return self.lease is not None

    @property
    def loaded(self) -> bool:
        """The chat is in memory (loaded from the log, or created here)."""
        return self._loaded

    @property
    def up_to_date(self) -> bool:
        """Its chat in memory is the stored one (it owns the chat, or just created it): a
        new follower may join without asking it (no ``Attach``)."""
        return self._loaded and (self.fresh or self.owns)

    def check_owner(self, owner: str) -> None:
        """Raises ``ChatNotFoundError`` unless the chat is ``owner``'s (the one check of
        who may see a chat, made on the chat the actor holds)."""
        if self.chat.owner != owner:
            raise ChatNotFoundError("chat not found")

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, recovery_reason: str) -> None:
        """Loads the chat, takes its lease if free (ending a response its dead owner left
        open: ``owner_lost`` if another process held the chat last), then serves until idle.
        Returns at once, ``lease_lost`` set, when the lease is lost."""
        self.turn, self._lock, self._work = None, trio.Lock(), trio.Event()
        self.lease_lost, self._scope = False, trio.CancelScope()
        self._outage, self._saving = None, False
        self._loaded = self._seed is not None
        with self._scope:
            if self.lease is None:  # a restarted actor still holds its lease
                self.lease = await self.context.cluster.leases.acquire(self.chat_id)
                if self.lease is not None and self.lease.taken_over:
                    recovery_reason = "owner_lost"
            self.fresh = False
            seed, self._seed = self._seed, None
            self.chat = seed if seed is not None else await self.store.get(self.chat_id)
            self.published_seq, self._loaded = self.chat.version, True
            if self.owns:
                try:
                    await self._recover(recovery_reason)
                except FencedError:
                    return  # lose_lease() has run
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._generate_loop)
                await self._receive_loop()
                nursery.cancel_scope.cancel()
        if self._outage is not None:
            raise ActorCrashedError(f"chat {self.chat_id}: a save failed") from self._outage

    def lose_lease(self) -> None:
        """The chat's lease is gone: writes stop at once, the running turn is abandoned and
        ``run()`` returns (the supervisor starts the actor again)."""
        if self.lease is None:
            return
        self.lease, self.lease_lost = None, True
        log.warning("chat %s: lease lost; its running response is abandoned", self.chat_id)
        if self.turn is not None:
            self.turn.abandon()
        self._scope.cancel()

    async def _recover(self, reason: str) -> None:
        """As the new owner: ends a response left open (text kept), answers what waits. A
        response waiting for a person's decision is not ended: its turn goes on from the log
        (``Turn._resume``)."""
        current = self.chat.current
        if current is not None and current.waiting_call() is None:
            await self.record(lambda chat: chat.interrupt_response(reason))
        self._work.set()

    async def _try_to_own(self) -> None:
        lease = await self.context.cluster.leases.acquire(self.chat_id)
        if lease is not None:
            self.lease = lease
            async with self._lock:
                await self._reload()
            try:
                await self._recover("owner_lost")
            except FencedError:
                pass  # lose_lease() has run

    async def _receive_loop(self) -> None:
        idle_since = trio.current_time()
        while True:
            wait = self.settings.passivate_after_s if self.owns else LEASE_RETRY_S
            with trio.move_on_after(wait) as timeout:
                command = await self._inbox.receive()
            if not timeout.cancelled_caught:
                await self._handle(command)
                idle_since = trio.current_time()
                continue
            if not self.owns:
                await self._try_to_own()
            idle = trio.current_time() - idle_since >= self.settings.passivate_after_s
            if idle and self.is_idle():
                return

    def is_idle(self) -> bool:
        """Nothing to answer or being answered (a follower holds nothing)."""
        chat = self.chat
        return not self.owns or (self.turn is None and not chat.pending and chat.current is None)

    def fail_waiting(self, error: BaseException) -> None:
        """Answers every command still in the mailbox with ``error`` and closes it."""
        for command in self.drain():
            command.reply.fail(error)

    def drain(self) -> list[Command]:
        """Takes every command still in the mailbox (on passivation) and closes it."""
        waiting: list[Command] = []
        while True:
            try:
                waiting.append(self._inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                self._inbox.close()
                return waiting

    # -- commands -----------------------------------------------------------------------

    async def _handle(self, command: Command) -> None:
        try:
            self.check_owner(command.owner)
            if isinstance(command, SendMessage):
                accepted = await self._receive_message(command)
                if accepted is not None:
                    command.reply.set(accepted)
            elif isinstance(command, StopGeneration):
                command.reply.set(await self._stop())
            elif isinstance(command, DecideTool):
                command.reply.set(await self._decide(command))
            elif isinstance(command, Attach):
                if not self.owns:
                    async with self._lock:
                        await self._reload()
                command.reply.set(None)
        except FencedError:
            self.context.redeliver(self.chat_id, command)  # nothing was written: run it again
        except EventsError as exc:
            command.reply.fail(exc)
        except trio.Cancelled:
            if self.lease_lost:  # nothing was written: the restarted actor runs it
                self.context.redeliver(self.chat_id, command)
            else:
                command.reply.fail(ActorStoppedError("the chat's actor stopped; try again"))
            raise
        except BaseException:
            command.reply.fail(ActorCrashedError("the chat's actor failed; try again"))
            raise

    async def _receive_message(self, command: SendMessage) -> Accepted | None:
        """Records a new message and returns its ``Accepted`` once durable; a re-sent
        ``client_message_id`` gets the original one (and its outcome) and records nothing."""
        cmid = command.client_message_id
        if cmid is not None and cmid in self.chat.client_message_ids:
            return self._accepted_before(cmid)
        admission = command.admission
        if admission is not None:
            try:
                admission.admit()
            except Exception as exc:  # noqa: BLE001 - the caller's refusal, reported to it
                command.reply.fail(exc)
                return None
        max_chars = self.settings.max_message_chars
        mutations: list[Mutation] = []
        early: str | None = None
        if self.owns and self.turn is None and self.chat.current is None and not self.chat.pending:
            # Nothing to wait for: its response starts in the same transaction, and the
            # model is called while that transaction commits (``_settle``).
            early = uuid4().hex
            mutations.append(lambda chat: self._start_early(chat, early))
            self._early = early

        def receive(chat: ChatSession) -> int:
            if command.regenerate:
                return chat.regenerate(command.reply_seq, cmid)
            return chat.receive_message(command.text, cmid, max_chars, command.model,
                                        command.edit_of)

        try:
            seq = await self.record(receive, *mutations)
        except DuplicateMessageError:  # recorded meanwhile by another process
            if admission is not None:
                admission.undo()
            return self._accepted_before(cmid or "")
        except BaseException:
            if admission is not None:
                admission.undo()
            raise
        finally:
            if early is not None:
                self._settle(early)
        self._work.set()
        return Accepted(self.chat_id, seq, cmid, answers=self.chat.answers(seq))

    def _start_early(self, chat: ChatSession, response_id: str) -> None:
        """Starts answering the request just applied, with the model it asked for (a
        regenerate: the one its message asked for), else the chat's."""
        model = chat.next_model() or chat.model or self.provider.default_model
        chat.start_response(model, upstream_name(self.provider, model), response_id)

    def _settle(self, response_id: str) -> None:
        """The transaction that started ``response_id`` has ended: a turn begun early may now
        publish, or must be abandoned (nothing recorded) if its start was not saved as it
        was begun (a failed save; another process's message answered first)."""
        self._early = None
        turn = self.turn
        if turn is None or turn.response_id != response_id:
            return
        current = self.chat.current
        saved = (
            current is not None
            and current.response_id == response_id
            and current.reply_to_seq == turn.reply_to_seq
            and not self.chat.pending_events
        )
        turn.settle(saved)

    def _accepted_before(self, client_message_id: str) -> Accepted:
        seq = self.chat.client_message_ids[client_message_id]
        response_id, outcome = self.chat.reply_to(seq)
        return Accepted(self.chat_id, seq, client_message_id, True, response_id, outcome,
                        self.chat.answers(seq))

    async def _stop(self) -> bool:
        if self.owns:
            return self.stop_here()
        async with self._lock:
            await self._reload()
        if self.chat.current is None:
            return False
        self.context.cluster.tell(StopAsked(self.chat_id))
        return True

    async def _decide(self, command: DecideTool) -> int:
        """Records a decision on a waiting tool call (the first one wins) and wakes the turn
        that waits for it."""
        if not self.owns:
            async with self._lock:
                await self._reload()
        seq = await self.record(lambda chat: chat.decide_tool(
            command.call_id, command.approve, command.reason, command.owner))
        if self.turn is not None:
            self.turn.decision_recorded()
        return seq

    def stop_here(self) -> bool:
        if self.turn is None:
            return False
        self.turn.stop()
        return True

    def refresh_soon(self) -> None:
        """Another process wrote this chat: reload it before the next answer (and at once
        if the running turn waits for a decision, which may be among what was written)."""
        self._stale = True
        self._work.set()
        if self.turn is not None:
            self.turn.refresh()

    async def _reload_now(self) -> None:
        async with self._lock:
            await self._reload()

    # -- generation ---------------------------------------------------------------------

    async def _generate_loop(self) -> None:
        while True:
            if self._stale:
                self._stale = False
                async with self._lock:
                    await self._reload()
            while self.owns and (self.chat.pending or self._started_with_its_message()):
                try:
                    await self._answer_next()
                except FencedError:
                    return  # lose_lease() has run
            await self._work.wait()
            self._work = trio.Event()

    def _started_with_its_message(self) -> bool:
        return self.turn is None and self.chat.current is not None

    async def _answer_next(self) -> None:
        """Answers the oldest waiting message; its response may have been started already,
        in the same transaction as the message (``_receive_message``), and that transaction
        may still be committing: the turn then holds its text back until ``_settle``."""
        if not self._started_with_its_message():
            model = self._model()
            provider = upstream_name(self.provider, model)
            await self.record(lambda chat: chat.start_response(model, provider))
        current = self.chat.current
        assert current is not None
        messages = self.chat.context(self.settings.context_messages)
        ports = replace(self.turn_ports, provider=for_model(self.provider, current.model))
        turn = self.turn = Turn(
            ports, current.response_id, current.model, current.reply_to_seq,
            settled=self._early != current.response_id,
        )
        turn.on_wait = lambda waiting: self.context.generating_changed(
            self.chat.owner, -1 if waiting else +1)
        turn.on_refresh = self._reload_now
        self.context.generating_changed(self.chat.owner, +1)
        try:
            with turn_span(self.context.telemetry, self.chat_id, current.response_id,
                           current.model):
                await turn.run(messages)
        finally:
            self.turn = None
            self.context.generating_changed(self.chat.owner, -1)
            if not turn.abandoned:
                self.context.cluster.tell(Ended(self.chat_id, current.response_id))

    def _model(self) -> str:
        return self.chat.next_model() or self.chat.model or self.provider.default_model

    def interrupt(self, reason: str) -> None:
        """Ends the running response as interrupted (recorded, text kept)."""
        if self.turn is not None:
            self.turn.interrupt(reason)

    # -- recording ----------------------------------------------------------------------

    async def record(self, first: Callable[[ChatSession], T], *more: Mutation) -> T:
        """Applies the mutations (``first``, then ``more``) to the chat and saves their
        events in one transaction.

        Returns ``first``'s result. A rule error leaves everything unchanged. If
        another process wrote the chat first (a follower recorded a message), the chat is
        reloaded and the mutations decide again on the stored state, a few times: they check
        what they need (a turn's text must continue the stored text exactly, see
        ``Turn._record_text``), so nothing is applied twice. The owner's saves carry its
        lease's fence: ``FencedError`` (nothing written) loses the lease (``lose_lease``);
        once lost, every save raises it at once. Any other store error reloads the chat and
        propagates; when the store did not answer at all, the actor stops instead (its
        supervisor starts it from the log once the store is back) and every later save
        raises at once.
        The save is shielded: once started, it completes and its events are published, even
        on cancellation.
        """
        async with self._lock:
            if self.lease_lost:
                raise FencedError(f"chat {self.chat_id} is no longer leased here")
            if self._outage is not None:
                raise StoreUnavailableError(str(self._outage))
            fence = self.lease.fence if self.lease is not None else None
            self._shown, self._saving = self._live_response(), True
            try:
                with trio.CancelScope(shield=True):
                    result = await self._save(fence, first, *more)
            finally:
                # after an outage the chat in memory is ahead of the log until the restart
                self._saving = self._outage is not None
        return result

    async def _save(self, fence: Fence | None, first: Callable[[ChatSession], T],
                    *more: Mutation) -> T:
        """``record``'s transaction and its publication, under the chat's lock."""
        for attempt in range(CONFLICT_RETRIES):
            started = trio.current_time()
            try:
                result = first(self.chat)
                for mutate in more:
                    mutate(self.chat)
                if self._early is not None:  # its model call starts now
                    self._work.set()
                recordings = await self.store.save(self.chat, fence=fence)
                break
            except ConcurrencyError:
                await self._reload()
                if attempt == CONFLICT_RETRIES - 1:
                    raise
            except (ChatRuleError, StoreError) as exc:
                if isinstance(exc, FencedError):
                    self.lose_lease()
                ahead = self.chat.pending_events or self.chat.version != self.published_seq
                waited = trio.current_time() - started >= self.settings.store_timeout_s / 2
                if ahead and isinstance(exc, StoreUnavailableError) and waited:
                    # the store did not answer: a reload would only wait out its timeout
                    # again. The actor stops; its supervisor starts it from the log once
                    # the store is back
                    self._outage = exc
                    self._scope.cancel()
                elif ahead:
                    await self._reload()
                raise
        if recordings:
            lowest = recordings[0].domain_event.originator_version
            for recording in recordings:
                event = recording.domain_event
                assert isinstance(event, ChatSession.Event)
                if isinstance(event, ChatSession.TokensGenerated):
                    # committed: only now is its text shown (write-ahead streaming)
                    self._publish_delta(TokenDelta(
                        self.chat_id, event.response_id, event.text, event.offset))
                self.published_seq = event.originator_version
                self.context.cluster.publish_event(self.chat_id, event)
            self.context.cluster.tell(Saved(self.chat_id, lowest, self.published_seq))
            self._work.set()
        return result

    async def _reload(self) -> None:
        """Replaces the chat in memory by the stored one; a failure here is a crash."""
        try:
            self.chat = await self.store.get(self.chat_id)
            self.published_seq = max(self.published_seq, self.chat.version)
        except EventsError as exc:
            raise ActorCrashedError(f"chat {self.chat_id} could not be reloaded") from exc

    def _publish_delta(self, delta: TokenDelta) -> None:
        """Sends committed text to this process's subscribers and to the other processes."""
        self.context.hub.publish(self.chat_id, delta)
        self.context.cluster.tell(Delta(self.chat_id, delta.response_id, delta.offset, delta.text))

    def live_state(self) -> LiveState:
        """What a subscriber joining now has missed: the last seq and the text so far (no
        more than the log holds: during a save, the state before it)."""
        response = self._shown if self._saving else self._live_response()
        return LiveState(self.published_seq, response)

    def _live_response(self) -> LiveResponse | None:
        current = self.chat.current
        if current is None:
            return None
        text = current.text
        if not self.owns:  # it runs in another process: its stored text, then live deltas
            text = self.context.cluster.remote_text(self.chat_id, current.response_id, text)
        approvals = tuple(ApprovalWait(c.call_id, c.tool, c.arguments)
                          for c in current.tool_calls if c.approval == "waiting")
        return LiveResponse(current.response_id, current.reply_to_seq, text, approvals)
