"""The bus: what one process must tell the others, batched into ``NOTIFY`` payloads (see
``cluster``'s docstring for the design, ``wire`` for the messages)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

import psycopg
import trio
from psycopg import sql

from ..config import Settings
from ..storage.postgres import connect
from .connections import BACKOFF_MAX_S, BACKOFF_START_S, LISTEN, NOTIFY, Connection, reason
from .wire import BusMessage, CatchUp, WireItem, decode, encode

log = logging.getLogger(__name__)

#: NOTIFY payloads must stay under 8000 bytes.
MAX_PAYLOAD = 7500
FLUSH_INTERVAL_S = 0.005

#: Longer deltas are sent in pieces of this many code points. JSON escapes a code point
#: outside the BMP as two ``\uXXXX`` (12 bytes): 500 of them still fit in one payload.
MAX_DELTA_CHARS = 500


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


class Bus:
    """Batched NOTIFY out, LISTEN in; ``deliver(message)`` runs on the trio thread. Messages
    are ``wire`` dataclasses; their compact wire form is the codec's (``wire.encode``)."""

    def __init__(self, settings: Settings, deliver: Callable[[BusMessage], None]) -> None:
        assert settings.database_url
        self._settings = settings
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
                    f"live channel: LISTEN connection lost ({reason(exc)}); reconnecting"
                )
                log.warning("bus: %s", self.problems["listen"])
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _listen(self, token: trio.lowlevel.TrioToken, listening: Callable[[], None]) -> None:
        """In a worker thread: LISTENs and hands items on until stopping; raises
        ``psycopg.Error`` when the connection fails."""
        with connect(self._settings, LISTEN) as conn:
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
        conn: Connection | None = None
        backoff, lost = BACKOFF_START_S, False

        def send(payloads: list[str]) -> None:
            nonlocal conn
            again = conn is not None  # a connection may have died while idle: one more try
            while True:
                current = conn = conn or connect(self._settings, NOTIFY)
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
                        f"live channel: NOTIFY connection lost ({reason(exc)}); reconnecting"
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
