"""``GET /chat/{id}/stream``: following a chat over SSE, resumable with ``Last-Event-ID``.

The stream is a WebSocket ``subscribe`` as ``text/event-stream``: ``chat_history``, the text
so far of a running reply, then every live frame, built by the same ``ChatFeed`` (so text
reaches it only once committed, guarantee 8). Each SSE event's ``id`` is ``<seq>:<offset>``:
the frames of every event of the chat up to ``seq`` were sent, and ``offset`` characters of
the reply still running after ``seq`` (0 when none runs). The frames of one event are
written together and share the id of the position after that event.

A reconnect that sends ``Last-Event-ID: S:O`` (EventSource does so itself) gets no
``chat_history``: the events after ``S`` are read from the log and turned into the frames
it missed, the reply running at ``S`` resumes at offset ``O``, and live frames follow, so
nothing is missed and nothing sent twice. ``: keep-alive`` comments go out after
``sse_keepalive_s`` of silence. A follower too slow to keep up, or the server shutting
down, ends the stream (the client resumes with its last id); a deleted chat ends it with an
``error`` frame. The client going away cancels the body, which closes the subscription.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from uuid import UUID

import trio
from pydantic import BaseModel, Field, RootModel
from quart import Blueprint, Response, current_app, request
from quart_schema import document_response, security_scheme, validate_querystring

from ..actors.errors import SubscriberDroppedError
from ..actors.hub import Subscription
from ..actors.messages import LiveItem, LiveState, TokenDelta
from ..events.application import ChatApplication
from ..events.domain import ActiveResponse, ChatSession
from ..events.replay import chat_at
from . import schemas as s
from .auth import current_user
from .errors import BadRequestError, RateLimitedError, web_error
from .feed import ChatFeed, Frame, open_feed
from .services import Services

follow = Blueprint("follow", __name__)
KEEPALIVE = b": keep-alive\n\n"
_POSITION = re.compile(r"(\d{1,10}):(\d{1,10})")


class StreamQuery(BaseModel):
    #: As ``subscribe``'s: the first ``chat_history`` holds the messages after it.
    after_seq: int | None = Field(None, ge=0, le=s.MAX_SEQ)
    #: For clients that cannot set the ``Last-Event-ID`` header (the header wins).
    last_event_id: str | None = Field(None, max_length=32)


class EventStreamText(RootModel[str]):
    """``text/event-stream``: ``id: <seq>:<offset>``, ``event: <frame's event>``,
    ``data: <frame as JSON>`` per frame, and ``: keep-alive`` comments."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a follower is: every event up to ``seq`` sent, and ``offset`` characters of the
    reply running after it."""

    seq: int
    offset: int

    @classmethod
    def parse(cls, raw: str) -> Position:
        found = _POSITION.fullmatch(raw.strip())
        if found is None:
            raise BadRequestError(f"Last-Event-ID must be <seq>:<offset>, not {raw[:40]!r}",
                                  "invalid_last_event_id")
        return cls(int(found[1]), int(found[2]))

    def __str__(self) -> str:
        return f"{self.seq}:{self.offset}"


@follow.get("/chat/<uuid:chat_id>/stream")
@validate_querystring(StreamQuery)
@document_response(EventStreamText, 200)
@document_response(s.ErrorBody, 400)
@document_response(s.ErrorBody, 401)
@document_response(s.ErrorBody, 404)
@document_response(s.ErrorBody, 429)
@document_response(s.ErrorBody, 503)
@security_scheme([{"bearer": []}])
async def stream(chat_id: UUID, query_args: StreamQuery) -> Response:
    """Follows the chat as Server-Sent Events: the WebSocket frames of ``subscribe``, each
    with an ``id`` that ``Last-Event-ID`` resumes from."""
    svc: Services = current_app.extensions["eventchat"]
    owner = current_user()
    raw = request.headers.get("Last-Event-ID") or query_args.last_event_id
    resume = Position.parse(raw) if raw else None
    stack = AsyncExitStack()
    try:
        _count_connection(svc, owner, stack)
        feed, sub = await stack.enter_async_context(open_feed(svc, owner, chat_id))
        follower = Follower(svc, feed, sub)
        opening = await follower.open(resume, query_args.after_seq)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stack.aclose()
        raise
    response = Response(SseBody(stack, follower.chunks(opening)),
                        content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response


def _count_connection(svc: Services, owner: str, stack: AsyncExitStack) -> None:
    """An SSE follow is one of the user's ``ws_connections_per_user`` connections."""
    limit = svc.settings.ws_connections_per_user
    if svc.sockets_of[owner] >= limit:
        raise RateLimitedError(f"at most {limit} connections (WebSocket or SSE) per user",
                               retry_after=5)
    svc.sockets_of[owner] += 1

    def release() -> None:
        svc.sockets_of[owner] -= 1
        if svc.sockets_of[owner] <= 0:
            del svc.sockets_of[owner]

    stack.callback(release)


class SseBody:
    """The response body: owns the subscription, released when the body is closed (the
    client went away, the stream ended, or the server stops)."""

    def __init__(self, stack: AsyncExitStack, chunks: AsyncGenerator[bytes, None]) -> None:
        self._stack = stack
        self._chunks = chunks

    def __aiter__(self) -> SseBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._chunks.aclose()
            await self._stack.aclose()


class Follower:
    """One SSE follower of a chat: its feed, and its position for the events' ids."""

    def __init__(self, svc: Services, feed: ChatFeed, sub: Subscription) -> None:
        self.svc = svc
        self.feed = feed
        self.sub = sub
        self.seq = sub.state.last_seq
        #: The response running after ``seq``, whose sent characters are the offset.
        self.running = None if sub.state.response is None else sub.state.response.response_id
        #: Live events up to this seq were sent already (a resume from a newer position).
        self.floor = 0

    def position(self) -> Position:
        offset = self.feed.sent.get(self.running, 0) if self.running is not None else 0
        return Position(self.seq, offset)

    def encode(self, frames: list[Frame]) -> bytes:
        """The frames as SSE events, with the id of the position now."""
        position = self.position()
        return b"".join(
            f"id: {position}\nevent: {f['event']}\ndata: {json.dumps(f)}\n\n".encode()
            for f in frames
        )

    # -- opening ------------------------------------------------------------------------

    async def open(self, resume: Position | None, after_seq: int | None) -> bytes:
        """The first chunk: history and the text so far, or what a resume missed."""
        state = self.sub.state
        if resume is None:
            chunk = self.encode([await self.feed.history(state, after_seq)])
            return chunk + self.encode(self.feed.in_progress(state))
        chunk = await self._missed(resume, state)
        if state.response is not None:  # its waiting tool calls were sent with their events
            chunk += self.encode([f for f in self.feed.in_progress(state)
                                  if f["event"] != "tool_approval"])
        return chunk

    async def _missed(self, resume: Position, state: LiveState) -> bytes:
        """The frames of the events after ``resume.seq`` up to the subscription's start,
        the reply running at ``resume.seq`` taken up at ``resume.offset``."""
        store = self.svc.store
        until = max(state.last_seq, resume.seq)
        chat, events = await store.read(missed_events, store.app, self.feed.chat_id,
                                         resume.seq, until)
        self.seq, self.floor = resume.seq, resume.seq
        current = chat.current if chat is not None else None
        self.running = None
        if current is not None:
            self.running = current.response_id
            self._take_up(current, events, state, resume.offset)
        chunks = [self.encode(await self.frames(event)) for event in events]
        return b"".join(chunks)

    def _take_up(self, current: ActiveResponse, events: list[ChatSession.Event],
                 state: LiveState, offset: int) -> None:
        """Primes the feed with the reply running at the resume point: ``offset``
        characters of it sent, its tools named."""
        rid = current.response_id
        text = current.text + "".join(
            e.text for e in events
            if isinstance(e, ChatSession.TokensGenerated) and e.response_id == rid)
        live = state.response
        if live is not None and live.response_id == rid and len(live.text) > len(text):
            text = live.text
        feed = self.feed
        feed.replies[rid] = current.reply_to_seq
        feed.sent[rid], feed.texts[rid] = offset, text[:offset]
        for call in current.tool_calls:
            feed.tools[call.call_id] = call.tool

    # -- live ---------------------------------------------------------------------------

    async def frames(self, item: LiveItem) -> list[Frame]:
        """The frames of one item, all of them (an ending's wait for the views included),
        the position moved past it."""
        async with aclosing(self.feed.frames(item)) as produced:
            frames = [frame async for frame in produced]
        if isinstance(item, TokenDelta):
            if self.running is None:  # a reply whose start this follower did not see
                self.running = item.response_id
            return frames
        if isinstance(item, ChatSession.ResponseStarted):
            self.running = item.response_id
        elif isinstance(item, ChatSession.ResponseEnded) and item.response_id == self.running:
            self.running = None
        seq = item.originator_version
        if seq <= self.floor:
            return []
        self.seq = max(self.seq, seq)
        return frames

    async def chunks(self, opening: bytes) -> AsyncGenerator[bytes, None]:
        """The body: the opening, then live frames and keep-alive comments until the client
        leaves, the follower is dropped, the chat is deleted or the server stops."""
        if opening:
            yield opening
        stop, wait_s = self.svc.disconnect, self.svc.settings.sse_keepalive_s
        while not stop.is_set():
            try:
                item = await next_item(self.sub, stop, wait_s)
                if item is None:
                    if not stop.is_set():
                        yield KEEPALIVE
                    continue
                frames = await self.frames(item)
            except SubscriberDroppedError:
                return  # the client resumes from its last id
            except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band
                error = web_error(exc)
                if error is None:
                    raise
                yield self.encode([error.frame(chat_id=self.feed.cid)])
                return
            if frames:
                yield self.encode(frames)


async def next_item(sub: Subscription, stop: trio.Event, wait_s: float) -> LiveItem | None:
    """The subscription's next item; None after ``wait_s`` without one, or once ``stop`` is
    set. Raises ``SubscriberDroppedError`` when the subscription was dropped."""
    found: list[LiveItem] = []
    dropped: SubscriberDroppedError | None = None

    async def take(done: trio.CancelScope) -> None:
        found.append(await sub.receive())
        done.cancel()

    async def watch(done: trio.CancelScope) -> None:
        await stop.wait()
        done.cancel()

    with trio.move_on_after(wait_s):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take, nursery.cancel_scope)
                nursery.start_soon(watch, nursery.cancel_scope)
        except* SubscriberDroppedError as group:
            dropped = group.exceptions[0]  # type: ignore[assignment]
    if dropped is not None:
        raise dropped
    return found[0] if found else None


def missed_events(
    app: ChatApplication, chat_id: UUID, after_seq: int, until_seq: int
) -> tuple[ChatSession | None, list[ChatSession.Event]]:
    """Blocking: the chat as it was at ``after_seq`` (None at 0) and its events after it up
    to ``until_seq``. Raises ``BadRequestError`` when ``after_seq`` is beyond its log."""
    chat = chat_at(app, chat_id, after_seq) if after_seq > 0 else None
    if chat is not None and chat.version < after_seq:
        raise BadRequestError(f"Last-Event-ID {after_seq}: the chat has no event {after_seq}",
                              "invalid_last_event_id")
    stored = app.recorder.select_events(chat_id, gt=after_seq or None, lte=until_seq)
    return chat, [app.mapper.to_domain_event(e) for e in stored]  # type: ignore[misc]
