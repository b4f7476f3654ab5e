"""Several server processes on one PostgreSQL: chat ownership and live fan-out.

``Leases`` decides which process runs a chat's actor: a session-level advisory lock per chat,
held on one dedicated connection per process (``application_name`` ``eventchat-leases``). A
process that dies loses its connection and so its locks, and the chats it owned can be taken
over. An advisory lock vanishes silently with its connection, so a lock is not proof enough
to write: each take also bumps the chat's *epoch* in the leases' table, and every save of the
chat carries that epoch as a ``Fence`` checked in the inserting transaction (``FencedRecorder``):
a process whose lock is gone can write no more once another has taken the chat. The lease
connection is checked every ``lease_check_interval_s``; when it fails, every chat leased on it
is reported lost (``on_lost``) at once and the connection is made again with backoff. On
SQLite there is one process per data directory, which owns every chat (``LocalLeases``).

``Bus`` carries what one process must tell the others, batched into ``NOTIFY`` payloads on a
channel named after the schema: streamed deltas (``d``), the seq range of events a process
saved (``e``), ends of responses (``z``), stop requests (``x``) and "catch up from the log"
(``r``). A dedicated connection (``eventchat-listen``) ``LISTEN``s in a worker thread and
hands each item to the trio side; another (``eventchat-notify``) sends. Delivery follows
PostgreSQL's: at most once, in order per sender; the event log stays the source of truth.
Both connections are made again with backoff after any error; items lost meanwhile are made
up from the log: after a new ``LISTEN`` the bus delivers ``r`` to this process, and after
items could not be sent it sends ``r`` to the others.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
import trio
from psycopg import sql

from ..config import Settings
from ..events.application import LEASES_TABLE, Fence
from ..events.errors import StoreUnavailableError
from .wire import BusMessage, CatchUp, WireItem, decode, encode

log = logging.getLogger(__name__)

#: NOTIFY payloads must stay under 8000 bytes.
MAX_PAYLOAD = 7500
FLUSH_INTERVAL_S = 0.005
#: Waits between two attempts to make a lost connection again.
BACKOFF_START_S = 0.1
#: Longest pause between two tries: a database back from a restart is used within 2 s.
BACKOFF_MAX_S = 2.0
#: A silent network loss fails a connection's calls within about 10 s instead of never.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
#: The ``application_name`` of each dedicated connection (``pg_stat_activity``).
LEASES_APP_NAME = "eventchat-leases"
LISTEN_APP_NAME = "eventchat-listen"
NOTIFY_APP_NAME = "eventchat-notify"


#: Longer deltas are sent in pieces of this many characters (a payload holds several).
MAX_DELTA_CHARS = 1000


def _encoded(items: list[WireItem]) -> list[str]:
    """Items as JSON lines, long deltas cut into pieces that fit in a payload."""
    lines: list[str] = []
    for item in items:
        text, offset = item.get("t"), item.get("o")
        if (item["k"] == "d" and isinstance(text, str) and isinstance(offset, int)
                and len(text) > MAX_DELTA_CHARS):
            for start in range(0, len(text), MAX_DELTA_CHARS):
                piece = {**item, "t": text[start : start + MAX_DELTA_CHARS], "o": offset + start}
                lines.append(json.dumps(piece, separators=(",", ":")))
        else:
            lines.append(json.dumps(item, separators=(",", ":")))
    return lines


def lock_key(chat_id: UUID) -> int:
    """A chat's advisory-lock key: its first 8 bytes as a signed 64-bit integer."""
    return int.from_bytes(chat_id.bytes[:8], "big", signed=True)


def connect(url: str, application_name: str) -> psycopg.Connection[Any]:
    """A dedicated autocommit connection, named for ``pg_stat_activity`` (blocking)."""
    return psycopg.connect(
        url, autocommit=True, connect_timeout=5, application_name=application_name, **KEEPALIVES
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class Lease:
    """This process runs ``chat_id``. ``fence`` is what its saves must carry (None: no other
    process can write, SQLite); ``taken_over``: the chat was last leased by another server
    (not this one before a restart)."""

    chat_id: UUID
    fence: Fence | None = None
    taken_over: bool = False


class LocalLeases:
    """One process owns every chat (SQLite: the data directory is locked): no fencing."""

    problem: str | None = None

    async def acquire(self, chat_id: UUID) -> Lease | None:
        return Lease(chat_id)

    async def release(self, chat_id: UUID) -> None:
        pass

    def close(self) -> None:
        pass


class PostgresLeases:
    """Advisory locks and epochs on one connection; calls are serialised and run in a worker
    thread. Any error on the connection loses every lease held on it: ``on_lost(chat_ids)``
    runs on the trio thread before any other lease call, and the connection is made again by
    the next call (``watch()`` makes one every ``lease_check_interval_s``, with backoff)."""

    def __init__(
        self, settings: Settings, on_lost: Callable[[list[UUID]], None] = lambda chats: None
    ) -> None:
        assert settings.database_url
        self._url = settings.database_url
        self._interval = settings.lease_check_interval_s
        self._on_lost = on_lost
        #: This server, as its restarts see it: host name and configured port.
        self.server = f"{socket.gethostname()}:{settings.port}"
        #: Who holds a lease, as the leases' table shows it: the server, pid and run tag.
        self.holder = f"{self.server}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        table = sql.SQL("{}.{}").format(
            sql.Identifier(settings.database_schema or "public"), sql.Identifier(LEASES_TABLE)
        )
        # The sub-select sees the row as it was before the statement: the last holder.
        self._take_epoch = sql.SQL(
            "INSERT INTO {t} AS l (chat_id, holder, epoch) VALUES (%(c)s, %(h)s, 1) "
            "ON CONFLICT (chat_id) DO UPDATE SET holder = EXCLUDED.holder, epoch = l.epoch + 1 "
            "RETURNING l.epoch, (SELECT holder FROM {t} WHERE chat_id = %(c)s) AS previous"
        ).format(t=table)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = trio.Lock()
        self._held: dict[UUID, Lease] = {}
        #: Why leases cannot be taken now (the connection is lost), or None.
        self.problem: str | None = None

    async def acquire(self, chat_id: UUID) -> Lease | None:
        """Takes the chat's lease if no process holds it, bumping its epoch; None if another
        process holds it or the database cannot be reached now."""
        try:
            with trio.CancelScope(shield=True):  # a lock taken is never left unrecorded
                taken = await self._call(self._take, chat_id)
        except StoreUnavailableError:
            return None
        if taken is None:
            return None
        epoch, previous = taken
        # a chat last leased by this server (host and port) is taken after its own restart
        others = previous is not None and previous.rsplit(":", 2)[0] != self.server
        lease = Lease(chat_id, Fence(chat_id, epoch), others)
        self._held[chat_id] = lease
        return lease

    def _take(self, conn: psycopg.Connection[Any], chat_id: UUID) -> tuple[int, str] | None:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(chat_id),)).fetchone()
        if not (row and row[0]):
            return None
        # waits for a save of the previous holder that is past its fence check to commit
        taken = conn.execute(self._take_epoch, {"c": chat_id, "h": self.holder}).fetchone()
        assert taken is not None
        return int(taken[0]), taken[1]

    async def release(self, chat_id: UUID) -> None:
        if self._held.pop(chat_id, None) is not None:
            with trio.CancelScope(shield=True):
                await self._call(_unlock, chat_id)

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Checks the connection every ``lease_check_interval_s`` until cancelled; after a
        failure, tries again with backoff (each try makes the connection again)."""
        task_status.started()
        backoff = BACKOFF_START_S
        while True:
            try:
                await self._call(_ping)
            except StoreUnavailableError:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_START_S
            await trio.sleep(self._interval)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._lock:
            try:
                result = await trio.to_thread.run_sync(self._in_thread, fn, *args)
            except psycopg.Error as exc:
                self._lose(_reason(exc))
                raise StoreUnavailableError("could not reach PostgreSQL for chat leases") from exc
            self.problem = None
            return result

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._conn is None:
            self._conn = connect(self._url, LEASES_APP_NAME)
        try:
            return fn(self._conn, *args)
        except psycopg.Error:
            # whatever went wrong, the locks go with the connection: none is kept by halves
            conn, self._conn = self._conn, None
            conn.close()
            raise

    def _lose(self, reason: str) -> None:
        self.problem = f"chat leases: connection lost ({reason}); reconnecting"
        lost, self._held = list(self._held), {}
        if lost:
            log.warning("lease connection lost (%s): %d chats stop being written here",
                        reason, len(lost))
            self._on_lost(lost)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _ping(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT 1")


def _unlock(conn: psycopg.Connection[Any], chat_id: UUID) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(chat_id),))


class Bus:
    """Batched NOTIFY out, LISTEN in; ``deliver(message)`` runs on the trio thread. Messages
    are ``wire`` dataclasses; their compact wire form is the codec's (``wire.encode``)."""

    def __init__(self, settings: Settings, deliver: Callable[[BusMessage], None]) -> None:
        assert settings.database_url
        self._url = settings.database_url
        self.channel = f"eventchat_{settings.database_schema}"[:63]
        self.sender = uuid.uuid4().hex[:12]
        self._deliver = deliver
        self._outbox: list[WireItem] = []
        self._waiting = trio.Event()
        self._stopping = False
        #: What is wrong now, by connection (``listen``, ``notify``); empty when all is well.
        self.problems: dict[str, str] = {}

    def tell(self, message: BusMessage) -> None:
        """Queues ``message`` for the other processes (see ``send``)."""
        self.send(**encode(message))

    def send(self, **item: str | int) -> None:
        """Queues an item, in its wire form, for the next NOTIFY (within
        ``FLUSH_INTERVAL_S``). A delta that continues the last queued one is merged into it:
        one item per burst, not per token."""
        last = self._outbox[-1] if self._outbox else None
        if item["k"] == "d" and last is not None and last["k"] == "d":
            text, offset, last_text, last_offset = item["t"], item["o"], last["t"], last["o"]
            if (
                last["r"] == item["r"]
                and isinstance(text, str) and isinstance(last_text, str)
                and isinstance(offset, int) and isinstance(last_offset, int)
                and last_offset + len(last_text) == offset
            ):
                last["t"] = last_text + text
                return
        self._outbox.append(item)
        self._waiting.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listens and sends until cancelled; reports started once first listening. A lost
        connection is made again with backoff, never ending the bus."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._listen_loop)
                task_status.started()
                await self._send_loop()
        finally:
            self._stopping = True

    async def _listen_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        token = trio.lowlevel.current_trio_token()
        backoff, started = BACKOFF_START_S, False

        def listening() -> None:  # on the trio thread, before any notification is handed on
            nonlocal backoff, started
            backoff = BACKOFF_START_S
            if self.problems.pop("listen", None) is not None:
                log.warning("bus: listening again; catching up from the log")
            if started:
                self._deliver(CatchUp())  # what was sent meanwhile is gone: read the log
            else:
                started = True
                task_status.started()

        while True:
            try:
                await trio.to_thread.run_sync(
                    self._listen, token, listening, abandon_on_cancel=True
                )
            except psycopg.Error as exc:
                self.problems["listen"] = (
                    f"live channel: LISTEN connection lost ({_reason(exc)}); reconnecting"
                )
                log.warning("bus: %s", self.problems["listen"])
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _listen(self, token: trio.lowlevel.TrioToken, listening: Callable[[], None]) -> None:
        """In a worker thread: LISTENs and hands items on until stopping; raises
        ``psycopg.Error`` when the connection fails."""
        with connect(self._url, LISTEN_APP_NAME) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            trio.from_thread.run_sync(listening, trio_token=token)
            own = f"{self.sender}|"
            while not self._stopping:
                for note in conn.notifies(timeout=0.25):
                    if not note.payload.startswith(own):  # PostgreSQL echoes our own
                        trio.from_thread.run_sync(self._receive, note.payload, trio_token=token)

    def _receive(self, payload: str) -> None:
        _, _, body = payload.partition("|")
        for line in body.split("\n"):
            try:
                self._deliver(decode(json.loads(line)))
            except Exception:  # noqa: BLE001 - one bad item must not stop the bus
                log.exception("could not handle a bus item")

    async def _send_loop(self) -> None:
        """Sends what is queued; after a failure, waits (backoff), drops what could not be
        sent and tells the others to catch up from the log (``r``) with the next batch."""
        limiter = trio.CapacityLimiter(1)
        conn: psycopg.Connection[Any] | None = None
        backoff, lost = BACKOFF_START_S, False

        def send(payloads: list[str]) -> None:
            nonlocal conn
            again = conn is not None  # a connection may have died while idle: one more try
            while True:
                current = conn = conn or connect(self._url, NOTIFY_APP_NAME)
                try:
                    for payload in payloads:  # a payload sent twice is harmless
                        current.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
                    return
                except psycopg.Error:
                    conn = None
                    current.close()
                    if not again:
                        raise
                    again = False

        try:
            while True:
                await self._waiting.wait()
                await trio.sleep(FLUSH_INTERVAL_S)
                items, self._outbox, self._waiting = self._outbox, [], trio.Event()
                if lost:
                    items.insert(0, encode(CatchUp()))
                try:
                    await trio.to_thread.run_sync(
                        send, self._payloads(_encoded(items)), limiter=limiter
                    )
                except psycopg.Error as exc:
                    self.problems["notify"] = (
                        f"live channel: NOTIFY connection lost ({_reason(exc)}); reconnecting"
                    )
                    log.warning("bus: %d live items not sent: %s", len(items), exc)
                    lost = True
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    self._waiting.set()  # try again, if only to send the catch-up
                    continue
                if lost:
                    lost, backoff = False, BACKOFF_START_S
                    self.problems.pop("notify", None)
                    log.warning("bus: sending again; the others catch up from the log")
        finally:
            if conn is not None:
                conn.close()

    def _payloads(self, items: list[str]) -> list[str]:
        payloads: list[str] = []
        batch: list[str] = []
        size = 0
        for item in items:
            if batch and size + len(item) + 1 > MAX_PAYLOAD:
                payloads.append(f"{self.sender}|" + "\n".join(batch))
                batch, size = [], 0
            batch.append(item)
            size += len(item) + 1
        if batch:
            payloads.append(f"{self.sender}|" + "\n".join(batch))
        return payloads


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
