"""The actor that owns one chat: its aggregate, its mailbox and its running response.

A ``SessionActor`` runs two tasks: the *receiver* takes commands from the bounded mailbox
(records user messages and acknowledges them once durable, stops responses), and the
*generator* answers waiting user messages one at a time, in arrival order. Every change to
the chat goes through ``record()``: one lock, one transaction, then the new events are
published to the chat's subscribers. If a save fails, the aggregate is reloaded from the log
so memory never runs ahead of the store. An actor idle for ``passivate_after_s`` returns
from ``run()``; any other exception is a crash for the supervisor to restart from the log.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from uuid import UUID

import trio

from ..events.domain import ChatSession
from ..events.errors import (
    ChatNotFoundError,
    ChatRuleError,
    DuplicateMessageError,
    EventsError,
    StoreError,
)
from .errors import ActorCrashedError, ActorStoppedError
from .messages import (
    Accepted,
    Attach,
    Command,
    LiveResponse,
    LiveState,
    SendMessage,
    StopGeneration,
)
from .turn import Mutation, Turn

if TYPE_CHECKING:
    from .system import ActorSystem

log = logging.getLogger(__name__)


class SessionActor:
    def __init__(self, system: ActorSystem, chat_id: UUID) -> None:
        self.system = system
        self.settings = system.settings
        self.store = system.store
        self.provider = system.provider
        self.tools = system.tools
        self.chat_id = chat_id
        self.mailbox, self._inbox = trio.open_memory_channel[Command](self.settings.mailbox_size)
        self.chat: ChatSession
        self.turn: Turn | None = None
        self.published_seq = 0
        self._lock = trio.Lock()
        self._work = trio.Event()
        self.passivated = False

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, recovery_reason: str) -> None:
        """Loads the chat, ends a response left open, then serves until idle."""
        self.turn, self._lock, self._work = None, trio.Lock(), trio.Event()
        self.chat = await self.store.get(self.chat_id)
        self.published_seq = self.chat.version
        if self.chat.current is not None:
            await self.record(lambda chat: chat.interrupt_response(recovery_reason))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._generate_loop)
            await self._receive_loop()
            nursery.cancel_scope.cancel()

    async def _receive_loop(self) -> None:
        while True:
            with trio.move_on_after(self.settings.passivate_after_s) as idle:
                command = await self._inbox.receive()
            if idle.cancelled_caught:
                if self.is_idle():
                    self.passivated = True
                    return
                continue
            await self._handle(command)

    def is_idle(self) -> bool:
        return self.turn is None and not self.chat.pending

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
            self._check_owner(command.owner)
            if isinstance(command, SendMessage):
                command.reply.set(await self._receive_message(command))
            elif isinstance(command, StopGeneration):
                command.reply.set(self._stop())
            elif isinstance(command, Attach):
                command.reply.set(None)
        except EventsError as exc:
            command.reply.fail(exc)
        except BaseException as exc:
            command.reply.fail(ActorStoppedError("the chat's actor stopped; try again"))
            raise

    def _check_owner(self, owner: str) -> None:
        if self.chat.owner != owner:
            raise ChatNotFoundError("chat not found")

    async def _receive_message(self, command: SendMessage) -> Accepted:
        max_chars = self.settings.max_message_chars
        try:
            seq = await self.record(
                lambda chat: chat.receive_message(command.text, command.client_message_id, max_chars)
            )
        except DuplicateMessageError as exc:
            response_id, outcome = self.chat.reply_to(exc.seq)
            return Accepted(self.chat_id, exc.seq, command.client_message_id, True, response_id, outcome)
        self._work.set()
        return Accepted(self.chat_id, seq, command.client_message_id)

    def _stop(self) -> bool:
        if self.turn is None:
            return False
        self.turn.stop()
        return True

    # -- generation ---------------------------------------------------------------------

    async def _generate_loop(self) -> None:
        while True:
            while self.chat.pending:
                await self._answer_next()
            await self._work.wait()
            self._work = trio.Event()

    async def _answer_next(self) -> None:
        model = self.chat.model or self.provider.default_model
        messages = self.chat.context(self.settings.context_messages)
        response_id = await self.record(lambda chat: chat.start_response(model, self.provider.name))
        self.turn = Turn(self, response_id, model)
        self.system.generating_changed(self.chat.owner, +1)
        try:
            await self.turn.run(messages)
        finally:
            self.turn = None
            self.system.generating_changed(self.chat.owner, -1)

    def interrupt(self, reason: str) -> None:
        """Ends the running response as interrupted (recorded, text kept)."""
        if self.turn is not None:
            self.turn.interrupt(reason)

    # -- recording ----------------------------------------------------------------------

    async def record(self, *mutations: Mutation) -> Any:
        """Applies ``mutations`` to the chat and saves their events in one transaction.

        Returns the last mutation's result. A rule error leaves everything unchanged; a
        store error reloads the chat from the log and propagates. The save is shielded:
        once started, it completes and its events are published, even on cancellation.
        """
        async with self._lock:
            with trio.CancelScope(shield=True):
                result = None
                try:
                    for mutate in mutations:
                        result = mutate(self.chat)
                    recordings = await self.store.save(self.chat)
                except (ChatRuleError, StoreError):
                    if self.chat.pending_events or self.chat.version != self.published_seq:
                        await self._reload()
                    raise
            for recording in recordings:
                self.published_seq = recording.domain_event.originator_version
                self.publish(recording.domain_event)
            return result

    async def _reload(self) -> None:
        """Replaces the chat in memory by the stored one; a failure here is a crash."""
        try:
            self.chat = await self.store.get(self.chat_id)
        except EventsError as exc:
            raise ActorCrashedError(f"chat {self.chat_id} could not be reloaded") from exc

    def publish(self, item: Any) -> None:
        self.system.hub.publish(self.chat_id, item)

    def live_state(self) -> LiveState:
        response = None
        if self.turn is not None and self.chat.current is not None:
            response = LiveResponse(
                self.turn.response_id, self.chat.current.reply_to_seq, self.turn.text
            )
        return LiveState(self.published_seq, response)
