"""Sending a user message, shared by ``POST /generate`` (JSON or SSE) and the WebSocket.

``admit`` checks the text before anything is written; ``open_chat`` names the chat and the
message's ``Admission`` (the user's limits), creating a chat if none is named (after
admitting the message, so that a refused message creates nothing); ``send`` records the
message through the chat's actor and returns once it is durable (``Accepted``). In an
existing chat the actor admits the message, if it is new only: a re-sent
``client_message_id`` is answered with the original ``Accepted`` (and, if its turn is done,
its outcome) whatever the limits.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, aclosing
from typing import Any
from uuid import UUID

import trio
from quart import Response

from ..actors.hub import Subscription
from ..actors.messages import Accepted
from ..events.domain import ChatSession
from ..events.errors import ChatRuleError
from . import schemas as s
from .errors import BadRequestError, NotFoundError, UnavailableError, web_error
from .feed import ChatFeed, Frame, open_feed
from .limits import Admission
from .services import Services


def admit(svc: Services, text: str, model: str | None = None) -> None:
    """Raises the contract's error if this message (for ``model``, if it names one) may not
    be sent now (before a chat is created for it, so that a refused message leaves nothing
    behind)."""
    if svc.closing.is_set():
        raise UnavailableError("the server is shutting down", "shutting_down")
    try:
        ChatSession.check_message(text, svc.settings.max_message_chars)
    except ChatRuleError as exc:
        raise BadRequestError(str(exc), exc.code) from None
    check_model(svc, model)


def check_model(svc: Services, model: str | None) -> None:
    """Raises 400 ``unknown_model`` unless ``model`` is None or one ``GET /models`` lists."""
    if model is not None and model not in svc.settings.model_ids():
        raise BadRequestError(f"unknown model {model!r}: GET /models lists the models",
                              "unknown_model")


async def open_chat(
    svc: Services, owner: str, chat_id: UUID | None, model: str | None = None
) -> tuple[UUID, Admission]:
    """``chat_id`` and the admission of the message about to be sent in it (to ``model``,
    else the chat's), its user's token budget checked; without a ``chat_id``, a new chat
    for that message, made only once the message is admitted (so that a refused message
    creates nothing)."""
    if chat_id is not None:
        admission = svc.limiter.admission(owner)
        await admission.check_budget(await _model_of(svc, owner, chat_id, model, admission))
        return chat_id, admission
    admission = svc.limiter.admission(owner, new_chat=True)
    await admission.check_budget(model or svc.settings.default_model)
    admission.admit()
    try:
        return await svc.system.open_chat(owner), admission
    except BaseException:
        admission.undo()
        raise


async def _model_of(svc: Services, owner: str, chat_id: UUID, model: str | None,
                    admission: Admission) -> str:
    """The model a message goes to: its own, else its chat's (read only when the user's
    budgets are per model), else the default."""
    if model is None and admission.budgeted_per_model():
        chat = await svc.views.get_chat(owner, chat_id)
        model = chat["model"] if chat is not None else None
    return model or svc.settings.default_model


async def send(
    svc: Services,
    owner: str,
    chat_id: UUID,
    text: str,
    client_message_id: str | None,
    admission: Admission,
    model: str | None = None,
    **branching: Any,
) -> Accepted:
    """Records the message (durable on return), to be answered by ``model`` (None: the
    chat's); ``branching`` makes it an edit or a regenerate (``ActorSystem.send_message``).
    Its actor admits it if it is new; a message that opened its chat, admitted already, is
    given back if it is not recorded."""
    opened = admission.admitted
    try:
        return await svc.system.send_message(chat_id, owner, text, client_message_id,
                                             admission, model, **branching)
    except BaseException:
        if opened:
            admission.undo()
        raise


def ack_frame(accepted: Accepted) -> Frame:
    return {"event": "ack", "chat_id": str(accepted.chat_id),
            "client_message_id": accepted.client_message_id, "seq": accepted.seq}


async def answer_frames(
    feed: ChatFeed, sub: Subscription, accepted: Accepted
) -> AsyncGenerator[Frame, None]:
    """The frames of the turn answering ``accepted``, ending with its ``chat_history``.

    Frames of other responses of the chat (one still running when this message arrived) are
    left out; the subscription must have started before the message was sent.
    """
    if accepted.outcome is not None:
        for frame in await feed.outcome_frames(accepted):
            yield frame
        return
    response_id = accepted.response_id
    if response_id is not None:  # a re-send of a message whose answer is under way
        feed.replies.setdefault(response_id, accepted.seq)
        state = sub.state.response
        if state is not None and state.response_id == response_id:
            for frame in feed.in_progress(sub.state):
                yield frame
    async for item in sub:
        answered = accepted.answers or accepted.seq  # a regenerate answers an older message
        if isinstance(item, ChatSession.ResponseStarted) and item.reply_to_seq == answered:
            response_id = item.response_id
        async with aclosing(feed.frames(item)) as produced:
            frames = [frame async for frame in produced]
        if response_id is None or getattr(item, "response_id", None) != response_id:
            continue
        for frame in frames:
            yield frame
        if isinstance(item, ChatSession.ResponseEnded):
            return


async def generate_json(svc: Services, owner: str, data: s.Generate) -> dict[str, object]:
    admit(svc, data.message, data.model)
    chat_id, counted = await open_chat(svc, owner, data.chat_id, data.model)
    async with open_feed(svc, owner, chat_id) as (feed, sub):
        accepted = await send(svc, owner, chat_id, data.message, data.client_message_id, counted,
                              data.model)
        return await answer_json(feed, sub, accepted)


async def answer_json(feed: ChatFeed, sub: Subscription, accepted: Accepted
                      ) -> dict[str, object]:
    """The JSON answer of a request that ``accepted`` acknowledged: its reply, as the turn's
    ``chat_history`` gives it, once the turn has ended."""
    message: dict[str, Any] | None = None
    async with aclosing(answer_frames(feed, sub, accepted)) as frames:
        async for frame in frames:
            if frame["event"] == "chat_history":
                message = next((m for m in frame["messages"] if m["role"] == "assistant"),
                               None)
    if message is None:
        raise NotFoundError("the answer could not be read back", "chat_not_found")
    return {"chat_id": str(accepted.chat_id), "response_id": message["response_id"],
            "message": message}


class EventStream:
    """An SSE body that owns the chat subscription: closing it (even unstarted) releases it."""

    def __init__(self, stack: AsyncExitStack, frames: AsyncIterator[Frame]) -> None:
        self._stack = stack
        self._frames = frames

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> bytes:
        frame = await self._frames.__anext__()
        return f"event: {frame['event']}\ndata: {json.dumps(frame)}\n\n".encode()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._frames.aclose()  # type: ignore[attr-defined]
            await self._stack.aclose()


async def generate_stream(svc: Services, owner: str, data: s.Generate) -> Response:
    """Checks, records the message, then streams the turn's frames (``ack`` first)."""
    admit(svc, data.message, data.model)
    stack = AsyncExitStack()
    try:
        chat_id, counted = await open_chat(svc, owner, data.chat_id, data.model)
        feed, sub = await stack.enter_async_context(open_feed(svc, owner, chat_id))
        accepted = await send(svc, owner, chat_id, data.message, data.client_message_id,
                              counted, data.model)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stack.aclose()
        raise

    async def frames() -> AsyncIterator[Frame]:
        yield ack_frame(accepted)
        try:
            async with aclosing(answer_frames(feed, sub, accepted)) as answer:
                async for frame in answer:
                    yield frame
        except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band
            error = web_error(exc)
            if error is None:
                raise
            yield error.frame(chat_id=str(chat_id))

    response = Response(EventStream(stack, frames()), content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response
