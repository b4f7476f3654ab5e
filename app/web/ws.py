"""The WebSocket ``/ws/chat``: one connection, many chats, every frame of the contract.

Per connection: one task reads and dispatches frames; one *sender* task records user
messages one at a time, in arrival order; one *follower* task per followed chat turns its
subscription into frames; one *writer* task drains a bounded outbound queue to the socket.
Nothing waits on a slow client: a follower or a command that finds the queue full closes
the connection (1013, with the reason) rather than slowing the chat's other followers.

Ordering: a follower subscribes before its history is read (``feed``), and frames of a chat
are held back while this connection is recording a message in it, so its ``ack`` always
comes before the frames of the answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import aclosing, contextmanager
from typing import TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import trio
from pydantic import BaseModel, Field, ValidationError
from quart import Blueprint, current_app, websocket

from ..actors.errors import SubscriberDroppedError
from ..config import Settings
from . import decisions
from .auth import current_user
from .bodies import loads
from .branches import Edit, Regenerate, Request, admit_request, send_request
from .errors import BadRequestError, ForbiddenError, RateLimitedError, WebError, web_error
from .feed import ChatFeed, Frame, open_feed
from .generate import ack_frame, admit, open_chat, send
from .player import Replay, done_frame, play, replay_cues
from .schemas import MAX_ID, MAX_SEQ, Text
from .services import Services

log = logging.getLogger(__name__)
Parsed = TypeVar("Parsed", bound=BaseModel)
ws = Blueprint("ws", __name__)

OUTBOUND_FRAMES = 1024
#: How often a replay waiting for room in the outbound queue looks again.
REPLAY_BACKOFF_S = 0.01
PENDING_MESSAGES = 32
CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN = 1001, 1013
#: Queued after the last frames on shutdown: the writer closes the connection on reaching it.
GOING_AWAY: Frame = {}


class UserMessage(BaseModel):
    message: Text
    chat_id: UUID | None = None
    client_message_id: Text | None = Field(None, min_length=1, max_length=MAX_ID)
    model: Text | None = Field(None, max_length=200)


class Subscribe(BaseModel):
    chat_id: UUID
    after_seq: int | None = Field(None, ge=0, le=MAX_SEQ)


class ChatCommand(BaseModel):
    chat_id: UUID


#: What a connection's sender task takes, in arrival order.
Queued = UserMessage | ChatCommand | Request


@ws.websocket("/ws/chat")
async def chat_socket() -> None:
    svc: Services = current_app.extensions["eventchat"]
    check_origin(svc.settings, websocket.headers.get("Origin"), websocket.headers.get("Host"),
                 websocket.scheme)
    owner = current_user()
    limit = svc.settings.ws_connections_per_user
    if svc.sockets_of[owner] >= limit:  # refused before the handshake completes: HTTP 429
        raise RateLimitedError(f"at most {limit} WebSocket connections per user",
                               retry_after=5)
    svc.sockets_of[owner] += 1
    try:
        await websocket.accept()
        connection = Connection(svc, owner)
        svc.connections += 1
        svc.sockets.add(connection)
        try:
            await connection.serve()
        finally:
            svc.sockets.discard(connection)
            svc.connections -= 1
    finally:
        svc.sockets_of[owner] -= 1
        if svc.sockets_of[owner] <= 0:
            del svc.sockets_of[owner]


async def watch_connections(svc: Services) -> None:
    """One task for every connection: closes those idle for ``ws_idle_timeout_s`` (1001),
    and at shutdown sends each its last frames and a 1001 close. (A task per connection
    would cost every idle connection its memory.)"""
    limit = svc.settings.ws_idle_timeout_s
    sweep = min(max(limit / 10, 0.05), 5.0)
    while not svc.disconnect.is_set():
        with trio.move_on_after(sweep):
            await svc.disconnect.wait()
        now = trio.current_time()
        for connection in list(svc.sockets):
            if now - connection.last_activity >= limit:
                connection.close(CLOSE_GOING_AWAY, "idle timeout")
    for connection in list(svc.sockets):
        connection.put(GOING_AWAY)  # every frame queued before it goes out first
    await trio.sleep(1)
    for connection in list(svc.sockets):  # the writer did not get to it: close anyway
        connection.close(CLOSE_GOING_AWAY, "server shutting down")


def check_origin(
    settings: Settings, origin: str | None, host: str | None, scheme: str = "ws"
) -> None:
    """Browsers send ``Origin``: it must be ours or listed; other clients send none.

    Origins are compared whole: scheme, host and port (a default port written or not).
    The server's own origin is ``http://Host`` on ``ws`` and ``https://Host`` on ``wss``;
    behind a proxy that ends TLS, list the public origin in ``allowed_origins``.
    """
    if origin is None:
        return
    allowed = settings.allowed_origins
    if "*" in allowed:
        return
    theirs = _origin_key(origin)
    own = None if host is None else _origin_key(
        f"{'https' if scheme == 'wss' else 'http'}://{host}"
    )
    if theirs is not None and (theirs == own or theirs in {_origin_key(o) for o in allowed}):
        return
    raise ForbiddenError(f"origin {origin} is not allowed", "origin_not_allowed")


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin, or None if it is not one (``null``, junk)."""
    try:
        parts = urlsplit(origin.strip().rstrip("/"))
        port = parts.port
    except ValueError:
        return None
    scheme, hostname = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not hostname:
        return None
    return scheme, hostname, port if port is not None else _DEFAULT_PORTS[scheme]


class Gate:
    """Open unless held; followers wait for it before sending a chat's frames."""

    def __init__(self) -> None:
        self.holders = 0
        self._open = trio.Event()
        self._open.set()

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.holders == 0:
            self._open = trio.Event()
        self.holders += 1
        try:
            yield
        finally:
            self.holders -= 1
            if self.holders == 0:
                self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


class Connection:
    def __init__(self, svc: Services, owner: str) -> None:
        self.svc = svc
        self.owner = owner
        # The queues and their tasks are made on first use: an idle connection holds only
        # its reader.
        self.out_send: trio.MemorySendChannel[Frame] | None = None
        #: Messages to record, in arrival order, and the stops sent after them.
        self.pending_send: trio.MemorySendChannel[Queued] | None = None
        self.following: dict[UUID, trio.CancelScope] = {}
        self.gates: dict[UUID, Gate] = {}
        self.replays: dict[UUID, trio.CancelScope] = {}
        self.close_reason: tuple[int, str] | None = None
        self.nursery: trio.Nursery
        self.last_activity = trio.current_time()

    async def serve(self) -> None:
        """Runs until the client leaves (cancellation), or it is closed for a reason."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await self._read()
        if self.close_reason is not None:
            code, reason = self.close_reason
            with trio.move_on_after(1):
                await websocket.close(code, reason)

    def close(self, code: int, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = (code, reason[:120])
        self.nursery.cancel_scope.cancel()

    def put(self, frame: Frame) -> None:
        """Queues a frame; a client too slow to take it is disconnected. The writer task
        starts with the first frame (an idle connection holds no task but its reader)."""
        if self.out_send is None:
            self.out_send, frames = trio.open_memory_channel[Frame](OUTBOUND_FRAMES)
            self.nursery.start_soon(self._write, frames)
        try:
            self.out_send.send_nowait(frame)
        except trio.WouldBlock:
            self.close(CLOSE_TRY_AGAIN, "too slow: outbound queue full")

    async def send(self, frame: Frame) -> None:
        """Queues a frame once the queue is less than half full: a replay goes at the
        client's pace and leaves the other half to live frames (which keep ``put``'s rule)."""
        while self._crowded():  # noqa: ASYNC110 - a channel tells no one that it has room
            await trio.sleep(REPLAY_BACKOFF_S)
        self.put(frame)

    def _crowded(self) -> bool:
        queue = self.out_send
        return queue is not None and queue.statistics().current_buffer_used >= OUTBOUND_FRAMES // 2

    # -- tasks ------------------------------------------------------------------------------

    async def _write(self, frames: trio.MemoryReceiveChannel[Frame]) -> None:
        async for frame in frames:
            if frame is GOING_AWAY:  # every frame queued before it has gone out
                self.close(CLOSE_GOING_AWAY, "server shutting down")
                return
            await websocket.send(json.dumps(frame))
            self.last_activity = trio.current_time()

    async def _read(self) -> None:
        while True:
            raw = await websocket.receive()
            self.last_activity = trio.current_time()
            self.svc.metrics.ws_frames.inc()
            try:
                await self._dispatch(raw)
            except WebError as error:
                self.put(error.frame())

    # -- commands -----------------------------------------------------------------------------

    async def _dispatch(self, raw: str | bytes) -> None:
        data = loads(raw)
        if not isinstance(data, dict):
            raise BadRequestError("a frame must be a JSON object", "invalid_frame")
        event = data.get("event")
        if event is None and "message" in data:
            event = "user_message"
        if event == "user_message":
            self._queue_message(_parse(UserMessage, data))
        elif event == "tool_decision":
            decision = _parse(decisions.ToolDecisionFrame, data)
            try:
                await decisions.decide(self.svc, self.owner, decision.chat_id, decision)
            except Exception as exc:  # refused: an error frame naming the call
                self.put(_mapped(exc).frame(chat_id=str(decision.chat_id),
                                            call_id=decision.call_id))
        elif event == "subscribe":
            subscribe = _parse(Subscribe, data)
            await self._follow(subscribe.chat_id, subscribe.after_seq, history=True)
        elif event == "unsubscribe":
            chat_id = _parse(ChatCommand, data).chat_id
            scope = self.following.pop(chat_id, None)
            if scope is not None:
                scope.cancel()
        elif event == "replay":
            replay = _parse(Replay, data)
            try:
                await self._replay(replay)
            except WebError as error:
                self.put(error.frame(chat_id=str(replay.chat_id)))
        elif event == "replay_stop":
            scope = self.replays.pop(_parse(ChatCommand, data).chat_id, None)
            if scope is not None:
                scope.cancel()
        elif event == "stop":
            command = _parse(ChatCommand, data)
            if self.pending_send is None:
                await self._stop(command.chat_id)
            else:  # after the messages sent before it: a stop right after a message stops
                self._enqueue(command)  # that message's answer
        elif event in ("regenerate", "edit"):
            request: Request = (_parse(Regenerate, data) if event == "regenerate"
                                else _parse(Edit, data))
            self._queue_request(request)
        else:
            raise BadRequestError(f"unknown event {event!r}", "unknown_event")

    def _queue_request(self, request: Request) -> None:
        """A regenerate or an edit waits its turn with the messages sent before it."""
        try:
            admit_request(self.svc, request)
            self._enqueue(request)
        except WebError as error:
            self.put(error.frame(chat_id=str(request.chat_id),
                                 client_message_id=request.client_message_id))

    def _queue_message(self, message: UserMessage) -> None:
        extra = {"chat_id": _str(message.chat_id), "client_message_id": message.client_message_id}
        try:
            admit(self.svc, message.message, message.model)
            self._enqueue(message)
        except WebError as error:
            self.put(error.frame(**extra))

    def _enqueue(self, command: Queued) -> None:
        if self.pending_send is None:
            self.pending_send, waiting = trio.open_memory_channel[Queued](
                PENDING_MESSAGES
            )
            self.nursery.start_soon(self._send_messages, waiting)
        try:
            self.pending_send.send_nowait(command)
        except trio.WouldBlock:
            raise RateLimitedError("too many messages waiting on this connection") from None

    async def _stop(self, chat_id: UUID) -> None:
        try:
            await self.svc.require_chat(self.owner, chat_id)
            stopped = await self.svc.system.stop_generation(chat_id, self.owner)
        except Exception as exc:
            raise _mapped(exc) from exc
        if not stopped:
            self.put({"event": "error", "code": "no_response_in_progress",
                      "message": "no response is being generated", "chat_id": str(chat_id)})

    async def _send_messages(
        self, waiting: trio.MemoryReceiveChannel[Queued]
    ) -> None:
        async for command in waiting:
            try:
                if isinstance(command, UserMessage):
                    await self._send_one(command)
                elif isinstance(command, Regenerate | Edit):
                    await self._send_request(command)
                else:
                    await self._stop(command.chat_id)
            except Exception as exc:  # noqa: BLE001 - reported to the client, then go on
                error = web_error(exc)
                if error is None:
                    log.exception("sending a message failed", exc_info=exc)
                    error = WebError("internal error")
                self.put(error.frame(chat_id=_str(command.chat_id),
                                     client_message_id=getattr(command, "client_message_id",
                                                               None)))

    async def _send_one(self, message: UserMessage) -> None:
        if message.chat_id is None or message.chat_id not in self.following:
            self._check_follow_limit()  # before a chat is made for a message it cannot follow
        chat_id, counted = await open_chat(self.svc, self.owner, message.chat_id, message.model)
        message = message.model_copy(update={"chat_id": chat_id})
        if chat_id not in self.following:
            await self._follow(chat_id, None, history=False)
        with self.gates.setdefault(chat_id, Gate()).hold():
            accepted = await send(self.svc, self.owner, chat_id, message.message,
                                  message.client_message_id, counted, message.model)
            self.put(ack_frame(accepted))
            if accepted.outcome is not None:
                feed = ChatFeed(self.svc, self.owner, chat_id)
                for frame in await feed.outcome_frames(accepted):
                    self.put(frame)

    async def _send_request(self, request: Request) -> None:
        chat_id = request.chat_id
        if chat_id not in self.following:
            await self._follow(chat_id, None, history=False)
        with self.gates.setdefault(chat_id, Gate()).hold():
            accepted = await send_request(self.svc, self.owner, request)
            self.put(ack_frame(accepted))
            if accepted.outcome is not None:
                feed = ChatFeed(self.svc, self.owner, chat_id)
                for frame in await feed.outcome_frames(accepted):
                    self.put(frame)

    # -- following --------------------------------------------------------------------------

    async def _follow(self, chat_id: UUID, after_seq: int | None, history: bool) -> None:
        """Starts following ``chat_id`` (again); raises if the chat cannot be followed."""
        if chat_id not in self.following:
            self._check_follow_limit()
        old = self.following.pop(chat_id, None)
        if old is not None:
            old.cancel()
        try:
            scope = await self.nursery.start(self._follower, chat_id, after_seq, history)
        except Exception as exc:
            raise _mapped(exc) from exc
        self.following[chat_id] = scope

    def _check_follow_limit(self) -> None:
        limit = self.svc.settings.follows_per_connection
        if len(self.following) >= limit:
            raise RateLimitedError(
                f"a connection follows at most {limit} chats: unsubscribe from one first"
            )

    async def _follower(
        self, chat_id: UUID, after_seq: int | None, history: bool,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        gate = self.gates.setdefault(chat_id, Gate())
        started = False
        with trio.CancelScope() as scope:
            try:
                async with open_feed(self.svc, self.owner, chat_id) as (feed, sub):
                    task_status.started(scope)
                    started = True
                    if history:
                        self.put(await feed.history(sub.state, after_seq))
                    for frame in feed.in_progress(sub.state):
                        self.put(frame)
                    async for item in sub:
                        await gate.wait()
                        async with aclosing(feed.frames(item)) as frames:
                            async for frame in frames:
                                self.put(frame)
            except SubscriberDroppedError as exc:
                self.close(CLOSE_TRY_AGAIN, f"too slow: {exc.reason}")
            except Exception as exc:
                error = web_error(exc)
                if error is None or not started:
                    raise
                self.put(error.frame(chat_id=str(chat_id)))
                self.following.pop(chat_id, None)

    # -- replaying --------------------------------------------------------------------------

    async def _replay(self, request: Replay) -> None:
        """Starts a replay of the chat, in place of any running one; raises (nothing sent)
        if the chat or the range is refused, or the connection replays as many chats at once
        as it may follow."""
        old = self.replays.pop(request.chat_id, None)
        if old is not None:
            old.cancel()
        limit = self.svc.settings.follows_per_connection
        if len(self.replays) >= limit:
            raise RateLimitedError(f"a connection replays at most {limit} chats at once: "
                                   "stop one first")
        try:
            scope = await self.nursery.start(self._replayer, request)
        except Exception as exc:
            raise _mapped(exc) from exc
        self.replays[request.chat_id] = scope

    async def _replayer(
        self, request: Replay,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            cues, last_seq = await replay_cues(self.svc, self.owner, request)
            task_status.started(scope)
            await play(cues, request.speed, self.send)
            await self.send(done_frame(request.chat_id, last_seq))
        if self.replays.get(request.chat_id) is scope:
            del self.replays[request.chat_id]


def _parse(model: type[Parsed], data: dict[str, object]) -> Parsed:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "frame"
        raise BadRequestError(f"invalid frame: {where}: {first.get('msg')}") from None


def _mapped(exc: Exception) -> WebError:
    error = web_error(exc)
    if error is None:
        raise exc
    return error


def _str(value: UUID | None) -> str | None:
    return None if value is None else str(value)
