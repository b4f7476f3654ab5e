"""Per-user limits: user messages per minute and responses generating at once.

``MessageLimiter.check(owner)`` raises ``RateLimitedError`` (429 / ``rate_limited`` frame,
with a retry delay) and otherwise counts the message. The window is a sliding minute kept
in memory per process; the generating count comes from the actor system.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable

import trio

from .errors import RateLimitedError

WINDOW_S = 60.0


class MessageLimiter:
    def __init__(
        self,
        per_minute: int,
        concurrent: int,
        generating_for: Callable[[str], int],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.per_minute = per_minute
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
