"""Write-ahead streaming: a reply's text is shown only once the log holds it.

``WriteAhead`` is the state of one reply's text between the model and the log, and does no
I/O: the turn feeds it what the model streams (``add``), asks it when the waiting text may
be committed (``due``), takes that text as a ``Group`` to commit (``take``) and reports the
commit (``committed``); the actor shows a group's text to the chat's followers only once the
transaction holding it has committed (``SessionActor.record``). So whatever happens, the log
holds every character anyone was sent.

Phases (``phase``):

``HELD``
    The response's start is still committing (its model call began early, see
    ``SessionActor._receive_message``): text waits, nothing may be committed before the start.
    ``settle(True)`` ends it; ``settle(False)`` (the start was not saved) closes the stream.
``READY``
    Nothing waits. Text that arrives now may be committed at once if the last commit began
    at least ``interval`` ago: the first text of a reply always is.
``WAITING``
    Text waits for its slot: a commit begins at most once per ``interval``.
``COMMITTING``
    A group's commit is in flight; text that arrives waits for the next group.
``CLOSED``
    The turn ended or was abandoned: nothing more is taken.

Each group keeps when each of its chunks arrived (``chunks``: code points and milliseconds
since the reply began), so that a replay can reproduce the reply's pacing.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Phase(enum.Enum):
    HELD = "held"
    READY = "ready"
    WAITING = "waiting"
    COMMITTING = "committing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Group:
    """Text to commit as one ``TokensGenerated`` event: it starts at ``offset`` (code points)
    in the reply, holds ``tokens`` tokens and the chunks it was streamed in, as
    ``(code points, milliseconds since the reply began)`` pairs."""

    offset: int
    text: str
    tokens: int
    chunks: tuple[tuple[int, int], ...]


class WriteAhead:
    """One reply's text on its way to the log (see the module docstring).

    ``interval`` is in the units of the times given to ``due`` and ``take`` (seconds of the
    caller's clock); ``offset`` is how much of the reply the log already holds.
    """

    def __init__(self, interval: float, *, offset: int = 0, held: bool = False) -> None:
        self.interval = interval
        self._held = held
        self._closed = False
        self._in_flight: Group | None = None
        self._text: list[str] = []
        self._tokens = 0
        self._chunks: list[tuple[int, int]] = []
        self._last_start = -math.inf
        #: Code points of the reply that the log holds (committed groups included).
        self.committed = offset

    @property
    def phase(self) -> Phase:
        if self._closed:
            return Phase.CLOSED
        if self._held:
            return Phase.HELD
        if self._in_flight is not None:
            return Phase.COMMITTING
        return Phase.WAITING if self._chunks else Phase.READY

    @property
    def waiting(self) -> int:
        """Code points streamed and not yet taken for a commit."""
        return sum(size for size, _ in self._chunks)

    def add(self, text: str, tokens: int, at_ms: int) -> None:
        """A chunk streamed by the model, ``at_ms`` milliseconds after the reply began."""
        if self._closed or not text:
            return
        self._text.append(text)
        self._tokens += tokens
        self._chunks.append((len(text), at_ms))

    def settle(self, saved: bool) -> None:
        """The response's start is durable (``saved``), or was not: then nothing is ever
        committed and the stream closes."""
        self._held = False
        if not saved:
            self.close()

    def due(self) -> float | None:
        """When the waiting text may be taken (possibly in the past: at once), or None if
        there is nothing to take now (nothing waits, held, a commit in flight, closed)."""
        if self.phase is not Phase.WAITING:
            return None
        return self._last_start + self.interval

    def take(self, now: float, *, rest: bool = False) -> Group | None:
        """The waiting text as a group to commit now, or None if there is none or its slot
        has not come (``rest``: regardless of the slot, as before a tool call and at the
        end of the reply). The stream is ``COMMITTING`` until ``committed`` or ``close``."""
        if self.phase is not Phase.WAITING:
            return None
        if not rest and now < self._last_start + self.interval:
            return None
        group = Group(self.committed, "".join(self._text), self._tokens, tuple(self._chunks))
        self._text, self._tokens, self._chunks = [], 0, []
        self._in_flight, self._last_start = group, now
        return group

    def committed_group(self, group: Group) -> None:
        """``group``'s transaction committed: its text may be shown."""
        assert group is self._in_flight, "only the group in flight commits"
        self._in_flight = None
        self.committed = group.offset + len(group.text)

    def close(self) -> None:
        """Nothing more is taken; text still waiting is dropped (it was never shown)."""
        self._closed, self._held, self._in_flight = True, False, None
        self._text, self._tokens, self._chunks = [], 0, []
