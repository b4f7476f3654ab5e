"""Per-user limits: user messages per minute, responses generating at once, chats created
per hour.

``MessageLimiter.check(owner)`` and ``check_chat(owner)`` raise ``RateLimitedError`` (429 /
``rate_limited`` frame, with a retry delay) and otherwise count the message or the chat.
The windows slide, kept in memory per process; the generating count comes from the actor
system. A message is admitted through one ``Admission`` (``MessageLimiter.admission``), in a
new chat or an existing one alike; with token budgets configured, the admission also checks
the user's usage of the day (``Admission.check_budget``, ``budgets.Budgeter``) before
anything is recorded.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .errors import QuotaExceededError, RateLimitedError

if TYPE_CHECKING:
    from .budgets import Budgeter

WINDOW_S = 60.0
CHAT_WINDOW_S = 3600.0


class MessageLimiter:
    def __init__(
        self,
        per_minute: int,
        concurrent: int,
        generating_for: Callable[[str], int],
        clock: Callable[[], float] = trio.current_time,
        chats_per_hour: int = 200,
        budgeter: Budgeter | None = None,
    ) -> None:
        self.budgeter = budgeter
        self.per_minute = per_minute
        self.chats_per_hour = chats_per_hour
        self._chats: dict[str, deque[float]] = defaultdict(deque)
        self.concurrent = concurrent
        self.generating_for = generating_for
        self.clock = clock
        self._sent: dict[str, deque[float]] = defaultdict(deque)

    def check(self, owner: str) -> Callable[[], None]:
        """Counts one message of ``owner``, or raises ``RateLimitedError`` if over a limit.

        Returns the undo of this count, for a message that could not be recorded after all.
        """
        now = self.clock()
        sent = self._sent[owner]
        while sent and sent[0] <= now - WINDOW_S:
            sent.popleft()
        if len(sent) >= self.per_minute:
            retry = sent[0] + WINDOW_S - now
            raise RateLimitedError(
                f"at most {self.per_minute} messages per minute", retry_after=retry
            )
        if self.generating_for(owner) >= self.concurrent:
            raise RateLimitedError(
                f"at most {self.concurrent} responses generating at once", retry_after=1
            )
        sent.append(now)

        def undo() -> None:
            if now in sent:
                sent.remove(now)

        return undo

    def admission(self, owner: str, new_chat: bool = False) -> Admission:
        """The admission of one message of ``owner`` (``new_chat``: and of its new chat)."""
        return Admission(self, owner, new_chat)

    def check_chat(self, owner: str) -> Callable[[], None]:
        """Counts one new chat of ``owner``, or raises ``RateLimitedError`` beyond
        ``chats_per_hour``. Returns the undo of this count."""
        now = self.clock()
        made = self._chats[owner]
        while made and made[0] <= now - CHAT_WINDOW_S:
            made.popleft()
        if len(made) >= self.chats_per_hour:
            raise RateLimitedError(f"at most {self.chats_per_hour} new chats per hour",
                                   retry_after=made[0] + CHAT_WINDOW_S - now)
        made.append(now)

        def undo() -> None:
            if now in made:
                made.remove(now)

        return undo


class Admission:
    """One user message (and, in a new chat, the chat) counted against its user's limits.

    ``admit()`` counts it, or raises ``RateLimitedError`` and counts nothing; ``undo()``
    gives back what was counted (the message could not be recorded after all). Each acts
    once: a message admitted before its chat was created is not counted again when its
    actor admits it. The actor admits a *new* message just before recording it (never a
    re-sent ``client_message_id``) and undoes it if the record fails.
    """

    def __init__(self, limiter: MessageLimiter, owner: str, new_chat: bool = False) -> None:
        self._limiter = limiter
        self._owner = owner
        self._new_chat = new_chat
        self._undo: list[Callable[[], None]] | None = None
        self._over_budget: QuotaExceededError | None = None

    @property
    def admitted(self) -> bool:
        return self._undo is not None

    def budgeted_per_model(self) -> bool:
        """The user's budgets differ per model (the model a message goes to matters)."""
        budgeter = self._limiter.budgeter
        return budgeter is not None and budgeter.per_model(self._owner)

    async def check_budget(self, model: str) -> None:
        """Reads the user's usage of the day: ``admit()`` then refuses the message with
        ``QuotaExceededError`` if a budget that ``model`` counts against is used up (a
        re-sent ``client_message_id``, never admitted, is still answered)."""
        budgeter = self._limiter.budgeter
        if budgeter is not None and budgeter.applies(self._owner, model):
            self._over_budget = await budgeter.refusal(self._owner, model)

    def admit(self) -> None:
        if self._undo is not None:
            return
        if self._over_budget is not None:
            raise self._over_budget
        undo = [self._limiter.check(self._owner)]
        if self._new_chat:
            try:
                undo.append(self._limiter.check_chat(self._owner))
            except BaseException:
                undo[0]()
                raise
        self._undo = undo

    def undo(self) -> None:
        undo, self._undo = self._undo or [], []
        for give_back in undo:
            give_back()
