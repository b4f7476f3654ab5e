"""Several server processes on one PostgreSQL: chat ownership and live fan-out.

The leases (``leases``) decide which process runs a chat's actor: a session-level advisory
lock per chat, held on one dedicated connection per process (``application_name``
``eventchat-leases``, with ``:<schema>`` like every ``storage.postgres`` connection; it has
no statement timeout, so that a slow statement never drops the leases). A process that dies
loses its connection and so its locks, and the chats it owned can be taken over. An
advisory lock vanishes silently with its connection, so a lock is not proof enough to
write: each take also bumps the chat's *epoch* in the leases' table, and every save of the
chat carries that epoch as a ``Fence`` checked in the inserting transaction
(``FencedRecorder``): a process whose lock is gone can write no more once another has taken
the chat. The lease connection is checked every ``lease_check_interval_s``; when it fails,
every chat leased on it is reported lost (``on_lost``) at once and the connection is made
again with backoff. On SQLite there is one process per data directory, which owns every
chat (``LocalLeases``).

The bus (``bus``, its messages in ``wire``) carries what one process must tell the others,
batched into ``NOTIFY`` payloads on a channel named after the schema: streamed deltas
(``d``), the seq range of events a process saved (``e``), ends of responses (``z``), stop
requests (``x``) and "catch up from the log" (``r``). A dedicated connection
(``eventchat-listen``) ``LISTEN``s in a worker thread and hands each item to the trio side;
another (``eventchat-notify``) sends. Delivery follows PostgreSQL's: at most once, in order
per sender; the event log stays the source of truth. Both connections are made again with
backoff after any error; items lost meanwhile are made up from the log: after a new
``LISTEN`` the bus delivers ``r`` to this process, and after items could not be sent it
sends ``r`` to the others.

``Cluster`` is all of it, as one object the actor system holds: the leases, the bus, the
text of responses running in other processes as this process has handed it on, the seqs its
followers were given, and the takeover of chats that a dead process left unfinished.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

import trio

from ..config import Settings
from ..events.domain import ChatSession
from ..events.errors import StoreError
from ..events.store import EventStore
from .bus import MAX_PAYLOAD as MAX_PAYLOAD
from .bus import Bus as Bus
from .bus import _encoded as _encoded
from .hub import Hub
from .leases import Lease as Lease
from .leases import LocalLeases, PostgresLeases
from .leases import lock_key as lock_key
from .messages import LiveState, TokenDelta
from .wire import BusMessage, CatchUp, Delta, Ended, Saved, StopAsked

if TYPE_CHECKING:
    from .session import SessionActor

log = logging.getLogger(__name__)

#: Items from other processes waiting to be applied before new ones are dropped.
BUS_BACKLOG = 10_000


class Cluster:
    """This process among the others sharing its database (on SQLite, alone: local leases,
    no bus). ``actors`` is the system's live map of running actors; ``resume`` starts the
    actors of unfinished chats (the takeover calls it every ``recovery_interval_s``)."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        hub: Hub,
        actors: Mapping[UUID, SessionActor],
        resume: Callable[[], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self._actors = actors
        self._resume = resume
        self.leases: LocalLeases | PostgresLeases = LocalLeases()
        self.bus: Bus | None = None
        if settings.store_kind == "postgres":
            self.leases = PostgresLeases(settings, self._leases_lost)
            self.bus = Bus(settings, self._from_others)
        self._from_bus, self._bus_items = trio.open_memory_channel[BusMessage](BUS_BACKLOG)
        #: Text streamed by responses running in other processes.
        self._remote: dict[UUID, RemoteText] = {}
        #: The seqs handed to the followers of each chat followed here.
        self._given: dict[UUID, SeqSet] = {}
        #: Items from other processes were lost: catch up from the log before the next one.
        self._catch_up_due = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs the bus and watches the lease connection until cancelled; reports started
        once the bus listens. On SQLite there is nothing to run."""
        async with trio.open_nursery() as nursery:
            if self.bus is not None:
                await nursery.start(self.bus.run)
                nursery.start_soon(self._feed_from_others)
            if isinstance(self.leases, PostgresLeases):
                await nursery.start(self.leases.watch)
            task_status.started()

    async def take_over(self) -> None:
        """Several processes: takes over the unfinished chats of a process that died, every
        ``recovery_interval_s``, until cancelled (returns at once alone)."""
        if self.bus is None:
            return
        while True:
            await trio.sleep(self.settings.recovery_interval_s)
            try:
                await self._resume()
            except StoreError as exc:
                log.warning("could not look for unfinished chats: %s", exc)

    def close(self) -> None:
        """Closes the lease connection (once no actor uses it any more)."""
        self.leases.close()

    def problems(self) -> list[str]:
        """What is degraded now (a lost connection to PostgreSQL being made again)."""
        found = list(self.bus.problems.values()) if self.bus is not None else []
        if self.leases.problem is not None:
            found.append(self.leases.problem)
        return found

    async def release(self, chat_id: UUID) -> None:
        """Gives the chat's lease back (within 2 s, even on cancellation; errors logged)."""
        with trio.move_on_after(2, shield=True):
            try:
                await self.leases.release(chat_id)
            except StoreError as exc:
                log.warning("could not release the lease of %s: %s", chat_id, exc)

    def publish_event(self, chat_id: UUID, event: ChatSession.Event) -> None:
        """Hands a stored event to the chat's followers here, unless they had it already."""
        given = self._given.get(chat_id)
        if given is None or given.add(event.originator_version):
            self.hub.publish(chat_id, event)

    def left(self, chat_id: UUID) -> None:
        """The last follower of the chat here has gone."""
        self._given.pop(chat_id, None)

    def _owns(self, chat_id: UUID) -> bool:
        actor = self._actors.get(chat_id)
        return actor is not None and actor.owns

    def tell(self, message: BusMessage) -> None:
        """Tells the other processes (none on SQLite)."""
        if self.bus is not None:
            self.bus.tell(message)

    def _leases_lost(self, chat_ids: list[UUID]) -> None:
        for chat_id in chat_ids:
            actor = self._actors.get(chat_id)
            if actor is not None:
                actor.lose_lease()

    def _from_others(self, message: BusMessage) -> None:
        if isinstance(message, CatchUp):
            self._catch_up_due = True
        try:
            self._from_bus.send_nowait(message)
        except trio.WouldBlock:
            self._catch_up_due = True
            log.warning("bus backlog full: a live item from another process was dropped")

    async def _feed_from_others(self) -> None:
        """Applies other processes' items in arrival order: stops, wake-ups, live frames;
        catches up from the log first when some were lost."""
        async for message in self._bus_items:
            if self._catch_up_due:
                self._catch_up_due = False
                await self._catch_up()
            if isinstance(message, CatchUp):
                continue
            chat_id = message.chat_id
            actor = self._actors.get(chat_id)
            owned = actor is not None and actor.owns
            if isinstance(message, StopAsked) and actor is not None and owned:
                actor.stop_here()
            elif isinstance(message, Saved):
                if actor is not None and owned:
                    actor.refresh_soon()
                given = self._given.get(chat_id)
                if given is not None:  # from the first seq not handed on: none is skipped
                    first = min(message.first, given.upto + 1)
                    await self._publish_stored(chat_id, first, message.last)
            elif isinstance(message, Delta) and not owned:
                # (text from an owner that lost the chat to this process is not handed on)
                self._remote_delta(chat_id, message.response_id, message.offset, message.text)
            elif isinstance(message, Ended):
                self._remote.pop(chat_id, None)

    async def _catch_up(self) -> None:
        """Items from other processes were lost: every actor reloads its chat (a message
        recorded elsewhere may be waiting for its owner), and the followers of each chat get
        the events they missed, read from the log."""
        log.info("catching up from the log: %d chats followed here", len(self._given))
        for actor in list(self._actors.values()):
            actor.refresh_soon()
        for chat_id, given in list(self._given.items()):
            await self._publish_stored(chat_id, given.upto + 1)

    async def _publish_stored(self, chat_id: UUID, first: int, last: int | None = None) -> None:
        def fetch() -> list[ChatSession.Event]:
            events = self.store.app.events.get(chat_id, gt=first - 1, lte=last)
            return [event for event in events if isinstance(event, ChatSession.Event)]

        try:
            events = await self.store.run(fetch)
        except StoreError as exc:
            log.warning("could not read events %s..%s of chat %s: %s", first, last, chat_id, exc)
            self._catch_up_due = True  # try again with the next item
            return
        for event in events:
            self.publish_event(chat_id, event)
            self._remote_event(chat_id, event)

    def _remote_delta(self, chat_id: UUID, response_id: str, offset: int, text: str) -> None:
        """Streamed text from another process: handed to the followers here if it continues
        what they have; after a gap, held until stored text closes it (``_remote_event``)."""
        remote = self._remote.get(chat_id)
        if remote is None or remote.response_id != response_id:
            remote = self._remote[chat_id] = RemoteText(response_id, offset)
        followed = self.hub.count(chat_id) > 0
        if offset > remote.end:
            if followed:
                remote.hold(offset, text)
                return
            remote = self._remote[chat_id] = RemoteText(response_id, offset)
        start = remote.end
        new = remote.extend(offset, text)
        if new and followed:
            self.hub.publish(chat_id, TokenDelta(chat_id, response_id, new, start))

    def _remote_event(self, chat_id: UUID, event: ChatSession.Event) -> None:
        """Keeps ``_remote`` in step with the stored events of another process's response."""
        if isinstance(event, ChatSession.ResponseStarted):
            self._remote[chat_id] = RemoteText(event.response_id)
        elif isinstance(event, ChatSession.ResponseEnded):
            self._remote.pop(chat_id, None)
        elif isinstance(event, ChatSession.TokensGenerated):
            remote = self._remote.get(chat_id)
            if remote is None or remote.response_id != event.response_id:
                remote = self._remote[chat_id] = RemoteText(event.response_id, event.offset)
            elif event.offset > remote.end:
                remote.start, remote.text = event.offset, ""
            remote.extend(event.offset, event.text)
            released = remote.release()
            if released is not None and self.hub.count(chat_id):
                offset, text = released
                self.hub.publish(chat_id, TokenDelta(chat_id, event.response_id, text, offset))

    def joined(self, chat_id: UUID, state: LiveState) -> None:
        """A follower joined with ``state``. The first one of a chat run elsewhere sets what
        later deltas must continue: the text it was given."""
        if chat_id in self._given:
            return
        self._given[chat_id] = SeqSet(state.last_seq)
        response = state.response
        if response is None or self._owns(chat_id):
            return
        old = self._remote.get(chat_id)
        remote = self._remote[chat_id] = RemoteText(response.response_id, 0, response.text)
        if old is not None and old.response_id == response.response_id and old.end > remote.end:
            remote.ahead = (old.start, old.text)

    def remote_text(self, chat_id: UUID, response_id: str, persisted: str) -> str:
        """The text so far of a response running in another process: what it persisted,
        completed by the deltas this process saw, when the two join up."""
        known = self._remote.get(chat_id)
        if known is None or known.response_id != response_id or known.start > len(persisted):
            return persisted
        if known.end < len(persisted):
            return persisted
        return persisted[: known.start] + known.text


@dataclass
class RemoteText:
    """A response running in another process, as this process has handed it on: its text,
    contiguous from ``start``. While the chat has followers here, deltas that come after a gap
    (items were lost) are held in ``ahead`` until stored text reaches them, so that every
    follower gets each character once and in order."""

    response_id: str
    start: int = 0
    text: str = ""
    ahead: tuple[int, str] | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.text)

    def extend(self, offset: int, text: str) -> str:
        """Adds ``text`` found at ``offset`` (at most ``end``); returns the part that is new."""
        assert offset <= self.end
        new = text[self.end - offset :]
        self.text += new
        return new

    def hold(self, offset: int, text: str) -> None:
        if self.ahead is not None and self.ahead[0] + len(self.ahead[1]) == offset:
            self.ahead = (self.ahead[0], self.ahead[1] + text)
        else:  # a later gap: what lies between will come from the log
            self.ahead = (offset, text)

    def release(self) -> tuple[int, str] | None:
        """The held text that now continues ``text``, as (offset, text), if any."""
        if self.ahead is None or self.ahead[0] > self.end:
            return None
        (offset, text), self.ahead = self.ahead, None
        start = self.end
        new = self.extend(offset, text)
        return (start, new) if new else None


class SeqSet:
    """The seqs of one chat handed to this process's followers: all up to ``upto``, and
    some above it (events from several processes can arrive out of order)."""

    def __init__(self, upto: int) -> None:
        self.upto = upto
        self._above: set[int] = set()

    def add(self, seq: int) -> bool:
        """Records ``seq``; False if it was handed on already."""
        if seq <= self.upto or seq in self._above:
            return False
        self._above.add(seq)
        while self.upto + 1 in self._above:
            self.upto += 1
            self._above.discard(self.upto)
        return True
