"""What goes in and out of a session actor: commands, replies and live items."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar
from uuid import UUID

import trio

from ..events.domain import ChatSession, Outcome

T = TypeVar("T")


class Reply(Generic[T]):
    """A one-shot answer from an actor to the task that sent it a command."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def set(self, value: T) -> None:
        if not self._done.is_set():
            self._value = value
            self._done.set()

    def fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    async def wait(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Accepted:
    """A user message is durably recorded as ``seq`` (the ``ack`` of the contract)."""

    chat_id: UUID
    seq: int
    client_message_id: str | None
    duplicate: bool = False
    #: The response answering it, once started, and how it ended, once it has.
    response_id: str | None = None
    outcome: Outcome | None = None
    #: The user message the request answers: ``seq`` itself, except for a regenerate.
    answers: int | None = None


class Admission(Protocol):
    """A new message's admission (the caller's limits): the actor calls ``admit()`` just
    before it records a *new* message (never for a re-sent ``client_message_id``), which
    raises to refuse it, and ``undo()`` when the message could not be recorded after all."""

    def admit(self) -> None: ...

    def undo(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SendMessage:
    owner: str
    text: str
    client_message_id: str | None
    admission: Admission | None = None
    reply: Reply[Accepted] = field(default_factory=Reply)
    #: The model to answer this message with (None: the chat's).
    model: str | None = None
    #: An edit: the user message this one is an alternative to.
    edit_of: int | None = None
    #: A regenerate (``text`` unused): answer again the message of reply ``reply_seq``
    #: (None: the active branch's last reply).
    regenerate: bool = False
    reply_seq: int | None = None


@dataclass(frozen=True, slots=True)
class StopGeneration:
    owner: str
    reply: Reply[bool] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class Attach:
    """Makes sure the actor is loaded and the caller may see the chat."""

    owner: str
    reply: Reply[None] = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class DecideTool:
    """A person's decision on a tool call that waits for approval; replies with its seq."""

    owner: str
    call_id: str
    approve: bool
    reason: str | None = None
    reply: Reply[int] = field(default_factory=Reply)


Command = SendMessage | StopGeneration | Attach | DecideTool


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """Streamed text, sent to subscribers as soon as the model produced it."""

    chat_id: UUID
    response_id: str
    text: str
    #: Character index of ``text`` in the full reply.
    offset: int


@dataclass(frozen=True, slots=True)
class ApprovalWait:
    """A tool call of the running response that waits for a person's decision."""

    call_id: str
    tool: str
    arguments: object


@dataclass(frozen=True, slots=True)
class LiveResponse:
    response_id: str
    reply_to_seq: int
    text: str
    #: Its calls waiting for a decision (a new follower is asked again).
    approvals: tuple[ApprovalWait, ...] = ()


@dataclass(frozen=True, slots=True)
class LiveState:
    """What a new subscriber has already missed: the last published seq and the text so far."""

    last_seq: int
    response: LiveResponse | None


#: An item a subscriber receives: a stored chat event or a live token delta.
LiveItem = ChatSession.Event | TokenDelta
