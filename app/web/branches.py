"""Branches over REST and the WebSocket: regenerate, edit, branch and fork.

A regenerate or an edit is a request like a user message: it goes through the chat's actor,
one at a time, with the same limits and budgets, idempotent with a ``client_message_id``,
and its answer streams as the usual frames (``Request`` carries it on the WebSocket's
sender queue). ``branch`` makes another branch the active one; ``fork`` copies the active
branch at one event into a new chat.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field
from quart import Blueprint, current_app
from quart_schema import document_response, security_scheme, validate_request

from ..actors.messages import Accepted
from . import schemas as s
from .auth import current_user
from .errors import NotFoundError, UnavailableError
from .feed import open_feed
from .generate import admit, open_chat, send
from .generate import answer_json as generate_answer
from .schemas import MAX_ID, MAX_SEQ, Text
from .services import Services

branches = Blueprint("branches", __name__)


class Regenerate(BaseModel):
    """``{"event": "regenerate", "chat_id", "seq"?, "client_message_id"?}``."""

    chat_id: UUID
    seq: int | None = Field(None, ge=1, le=MAX_SEQ)
    client_message_id: Text | None = Field(None, min_length=1, max_length=MAX_ID)


class Edit(BaseModel):
    """``{"event": "edit", "chat_id", "seq", "message", "client_message_id"?}``."""

    chat_id: UUID
    seq: int = Field(ge=1, le=MAX_SEQ)
    message: Text
    client_message_id: Text | None = Field(None, min_length=1, max_length=MAX_ID)
    #: The model to answer the edited message with (None: the chat's).
    model: Text | None = Field(None, max_length=200)


#: A regenerate or an edit, queued on a connection like a user message.
Request = Regenerate | Edit


class RegenerateBody(BaseModel):
    seq: int | None = Field(None, ge=1, le=MAX_SEQ)
    client_message_id: Text | None = Field(None, min_length=1, max_length=MAX_ID)


class EditBody(BaseModel):
    seq: int = Field(ge=1, le=MAX_SEQ)
    message: Text
    client_message_id: Text | None = Field(None, min_length=1, max_length=MAX_ID)


class BranchBody(BaseModel):
    seq: int = Field(ge=1, le=MAX_SEQ)


class ForkBody(BaseModel):
    at_seq: int = Field(ge=1, le=MAX_SEQ)
    title: Text | None = Field(None, max_length=200)


def admit_request(svc: Services, request: Request) -> None:
    """Raises the contract's error if the request may not be sent now (checked before it is
    queued, as a user message's text is)."""
    if isinstance(request, Edit):
        admit(svc, request.message, request.model)
    elif svc.closing.is_set():
        raise UnavailableError("the server is shutting down", "shutting_down")


async def send_request(svc: Services, owner: str, request: Request) -> Accepted:
    """Records the request through the chat's actor (durable on return), admitted with the
    user's limits and budgets as a message in that chat is."""
    model = request.model if isinstance(request, Edit) else None
    chat_id, admission = await open_chat(svc, owner, request.chat_id, model)
    if isinstance(request, Edit):
        return await send(svc, owner, chat_id, request.message, request.client_message_id,
                          admission, request.model, edit_of=request.seq)
    return await send(svc, owner, chat_id, "", request.client_message_id, admission,
                      regenerate=True, reply_seq=request.seq)


async def answer_json(svc: Services, owner: str, request: Request) -> dict[str, object]:
    """Sends the request and answers, as ``POST /generate`` does, with its reply."""
    admit_request(svc, request)
    await svc.require_chat(owner, request.chat_id)
    async with open_feed(svc, owner, request.chat_id) as (feed, sub):
        accepted = await send_request(svc, owner, request)
        return await generate_answer(feed, sub, accepted)


def services() -> Services:
    return current_app.extensions["eventchat"]  # type: ignore[no-any-return]


def documented(status: int, model: type[BaseModel]) -> Any:
    def decorate(fn: Any) -> Any:
        fn = document_response(model, status)(fn)
        for code in (400, 401, 404, 409, 429, 503):
            fn = document_response(s.ErrorBody, code)(fn)
        return security_scheme([{"bearer": []}])(fn)

    return decorate


@branches.post("/chat/<uuid:chat_id>/regenerate")
@validate_request(RegenerateBody)
@documented(200, s.GenerateAnswer)
async def regenerate(chat_id: UUID, data: RegenerateBody) -> dict[str, object]:
    """Answers again the user message before reply ``seq`` (default: the active branch's
    last reply), as a new sibling of that reply; answers with the new reply."""
    request = Regenerate(chat_id=chat_id, seq=data.seq, client_message_id=data.client_message_id)
    return await answer_json(services(), current_user(), request)


@branches.post("/chat/<uuid:chat_id>/edit")
@validate_request(EditBody)
@documented(200, s.GenerateAnswer)
async def edit(chat_id: UUID, data: EditBody) -> dict[str, object]:
    """A new user message as a sibling of user message ``seq``, made active and answered;
    answers with its reply."""
    request = Edit(chat_id=chat_id, seq=data.seq, message=data.message,
                   client_message_id=data.client_message_id, model=None)
    return await answer_json(services(), current_user(), request)


@branches.post("/chat/<uuid:chat_id>/branch")
@validate_request(BranchBody)
@documented(200, s.ChatPage)
async def branch(chat_id: UUID, data: BranchBody) -> dict[str, object]:
    """Makes the branch through message ``seq`` active (its newest deepest descendant
    becomes the leaf); answers with the chat and the active branch's latest page."""
    owner, svc = current_user(), services()
    await svc.require_chat(owner, chat_id)
    await svc.system.select_branch(chat_id, owner, data.seq)
    await svc.caught_up(chat_id=chat_id)
    chat = await svc.views.get_chat(owner, chat_id)
    if chat is None:
        raise NotFoundError("chat not found", "chat_not_found")
    messages, more = await svc.views.messages(owner, chat_id)
    return {"chat": chat, "messages": messages, "has_more": more}


@branches.post("/chat/<uuid:chat_id>/fork")
@validate_request(ForkBody)
@documented(201, s.Chat)
async def fork(chat_id: UUID, data: ForkBody) -> tuple[dict[str, object], int]:
    """A new chat holding the active branch as it was right after event ``at_seq``, with
    ``forked_from`` (the chat, the seq and the audit chain hash there)."""
    owner, svc = current_user(), services()
    await svc.require_chat(owner, chat_id)
    undo = svc.limiter.check_chat(owner)
    try:
        new_id = await svc.system.fork_chat(chat_id, owner, data.at_seq, data.title)
    except BaseException:
        undo()
        raise
    await svc.caught_up()
    chat = await svc.views.get_chat(owner, new_id)
    if chat is None:
        raise UnavailableError("the fork is not readable yet: try GET /chat/{id}",
                               "store_unavailable", retry_after=1)
    return dict(chat), 201

