"""The REST routes of the contract (``/chat``, ``/chats``, ``/generate``, ``/stats``...).

Routes read the views (never the log, except ``/chat/{id}/events``, the audit trail), write
through the actor system, and after a write wait (bounded) for the views to include it, so
a following GET sees it. Errors are raised and turned into JSON bodies by ``errors``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal, TypeVar
from uuid import UUID

import trio
from pydantic import BaseModel
from quart import Blueprint, Response, current_app, request
from quart.blueprints import BlueprintSetupState
from quart_schema import (
    HttpSecurityScheme,
    document_response,
    security_scheme,
    validate_querystring,
    validate_request,
)

from ..events.audit import verify_chat
from ..events.domain import ChatSession
from ..events.errors import StoreError
from ..events.export import FORMATS, render
from ..events.replay import chat_records
from ..projections.projector import iso
from ..projections.timetravel import SeqOutOfRangeError, chat_page_at
from ..storage.errors import ViewStoreError
from . import schemas as s
from .auth import current_user, require_metrics_token
from .decisions import Decided, ToolDecision, decide
from .errors import BadRequestError, NotFoundError
from .generate import check_model, generate_json, generate_stream
from .metrics import CONTENT_TYPE
from .services import Services

rest = Blueprint("rest", __name__)
HEALTH_TIMEOUT_S = 3.0
#: ``/health`` is ``degraded`` for this long after a store call failed (a write may fail
#: while reads answer: a locked table, a full disk).
FAILURE_MEMORY_S = 1.0
PROTOCOL_VERSION = "1.1"
ERRORS = {400: s.ErrorBody, 401: s.ErrorBody, 404: s.ErrorBody, 503: s.ErrorBody}


def services() -> Services:
    return current_app.extensions["eventchat"]  # type: ignore[no-any-return]


Route = TypeVar("Route", bound=Callable[..., Awaitable[object]])


def documented(
    model: type[BaseModel], status: int = 200, *errors: int
) -> Callable[[Route], Route]:
    """Documents the answer and the error answers of a route."""

    def decorate(fn: Route) -> Route:
        fn = document_response(model, status)(fn)
        for code in (400, 401, 503, *errors):
            fn = document_response(s.ErrorBody, code)(fn)
        return security_scheme([{"bearer": []}])(fn)

    return decorate


@rest.post("/chat")
@validate_request(s.CreateChat)
@documented(s.Chat, 201, 413, 429)
async def create_chat(data: s.CreateChat) -> tuple[dict[str, object], int]:
    """Creates a chat."""
    owner, svc = current_user(), services()
    check_model(svc, data.model)
    undo = svc.limiter.check_chat(owner)
    try:
        chat_id = await svc.system.create_chat(owner, data.title, data.model, data.system_prompt,
                                               data.max_tokens)
    except BaseException:
        undo()
        raise
    await svc.caught_up()
    chat = await svc.views.get_chat(owner, chat_id)
    if chat is not None:
        return dict(chat), 201
    now = iso(datetime.now(UTC))  # the views lag beyond the bound: answer from what was written
    return {"id": str(chat_id), "title": data.title or "New chat", "created_at": now,
            "updated_at": now, "model": data.model, "message_count": 0,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}, 201


@rest.get("/chats")
@validate_querystring(s.ChatsQuery)
@documented(s.ChatList)
async def list_chats(query_args: s.ChatsQuery) -> dict[str, object]:
    """The caller's chats, most recent activity first; ``q`` searches them instead."""
    owner, svc = current_user(), services()
    views = svc.views
    await svc.seen_own_writes()
    if query_args.q is not None and query_args.q.strip():
        hits = await views.search(owner, query_args.q, query_args.limit)
        return {"chats": [{**h["chat"], "snippets": h["snippets"]} for h in hits],
                "next_cursor": None}
    chats, cursor = await views.list_chats(owner, query_args.limit, query_args.cursor)
    return {"chats": chats, "next_cursor": cursor}


@rest.get("/chat/<uuid:chat_id>")
@validate_querystring(s.ChatQuery)
@documented(s.ChatPage, 200, 404)
async def get_chat(chat_id: UUID, query_args: s.ChatQuery) -> dict[str, object]:
    """A chat and a page of its messages, oldest first; with ``at_seq``, as they were right
    after that event (rebuilt from the log by the views' own handlers)."""
    owner, svc = current_user(), services()
    if query_args.at_seq is not None:
        return await _chat_at(svc, owner, chat_id, query_args)
    views = svc.views
    await svc.seen_own_writes()
    chat = await views.get_chat(owner, chat_id)
    if chat is None:
        raise NotFoundError("chat not found", "chat_not_found")
    messages, more = await views.messages(owner, chat_id, query_args.limit,
                                          before_seq=query_args.before_seq)
    return {"chat": chat, "messages": messages, "has_more": more}


async def _chat_at(svc: Services, owner: str, chat_id: UUID,
                   query: s.ChatQuery) -> dict[str, object]:
    assert query.at_seq is not None
    await svc.require_chat(owner, chat_id)
    try:
        chat, messages, more = await svc.store.read(
            chat_page_at, svc.store.app, chat_id, query.at_seq, query.limit, query.before_seq)
    except SeqOutOfRangeError as exc:
        raise BadRequestError(str(exc), "invalid_seq_range") from None
    return {"chat": chat, "messages": messages, "has_more": more}


@rest.patch("/chat/<uuid:chat_id>")
@validate_request(s.UpdateChat)
@documented(s.Chat, 200, 404)
async def update_chat(chat_id: UUID, data: s.UpdateChat) -> dict[str, object]:
    """Renames the chat, or changes its model or system prompt (each recorded as an event);
    a bad body changes nothing."""
    owner, svc = current_user(), services()
    given = data.model_fields_set
    if "title" in given and data.title is None:
        raise BadRequestError("invalid request: title: a chat's title cannot be null")
    if "model" in given:
        check_model(svc, data.model)
    await svc.require_chat(owner, chat_id)

    def change(chat: ChatSession) -> None:
        if data.title is not None:
            chat.rename(data.title)
        if "model" in given:
            chat.change_model(data.model)
        if "system_prompt" in given:
            chat.change_system_prompt(data.system_prompt)

    await svc.system.change_chat(chat_id, owner, change)
    await svc.caught_up(chat_id=chat_id)
    chat = await svc.views.get_chat(owner, chat_id)
    if chat is None:
        raise NotFoundError("chat not found", "chat_not_found")
    return dict(chat)


@rest.delete("/chat/<uuid:chat_id>")
@document_response(s.NoContent, 204)
@document_response(s.ErrorBody, 404)
@document_response(s.ErrorBody, 503)
@security_scheme([{"bearer": []}])
async def delete_chat(chat_id: UUID) -> tuple[str, int]:
    """Deletes the chat: stops its running response, records who deleted it and when,
    destroys its key (its stored events can no longer be read) and removes it from every
    view and the search index. See docs/operations.md for what remains and the purge step."""
    owner, svc = current_user(), services()
    await svc.require_chat(owner, chat_id)
    await svc.system.delete_chat(chat_id, owner)
    await svc.caught_up(chat_id=chat_id)  # gone from the views before the answer
    return "", 204


@rest.post("/generate")
@validate_request(s.Generate)
@documented(s.GenerateAnswer, 200, 404, 409, 413, 429)
async def generate(data: s.Generate) -> dict[str, object] | Response:
    """Sends a message and answers with the reply (or streams its frames as SSE)."""
    if data.stream:
        return await generate_stream(services(), current_user(), data)
    return await generate_json(services(), current_user(), data)


@rest.post("/chat/<uuid:chat_id>/stop")
@documented(s.Stopped, 202, 404)
async def stop(chat_id: UUID) -> tuple[dict[str, object], int]:
    """Stops the chat's running response, if any."""
    owner, svc = current_user(), services()
    await svc.require_chat(owner, chat_id)
    stopped = await svc.system.stop_generation(chat_id, owner)
    return {"chat_id": str(chat_id), "stopped": stopped}, 202


@rest.post("/chat/<uuid:chat_id>/tool-decision")
@validate_request(ToolDecision)
@documented(Decided, 200, 404, 409)
async def tool_decision(chat_id: UUID, data: ToolDecision) -> dict[str, object]:
    """Approves or denies a tool call that waits for a person's decision (the first
    decision wins: 409 ``already_decided``; 404 ``tool_call_not_found``)."""
    return await decide(services(), current_user(), chat_id, data)


@rest.get("/chat/<uuid:chat_id>/events")
@validate_querystring(s.EventsQuery)
@documented(s.EventPage, 200, 404)
async def events(chat_id: UUID, query_args: s.EventsQuery) -> dict[str, object]:
    """The chat's stored event log (the audit trail), after ``after_seq``."""
    svc = services()
    await svc.require_chat(current_user(), chat_id)
    page = await svc.store.read(chat_records, svc.store.app, chat_id, query_args.after_seq,
                                None, query_args.limit)
    last = page[-1]["seq"] if page else query_args.after_seq
    return {"events": page, "next_after_seq": last}


@rest.get("/chat/<uuid:chat_id>/audit")
@documented(s.Audit, 200, 404)
async def audit(chat_id: UUID) -> dict[str, object]:
    """Checks the chat's audit chain: its head, and the first seq that does not hold."""
    svc = services()
    await svc.require_chat(current_user(), chat_id)
    verdict = await svc.store.read(verify_chat, svc.store.app, chat_id)
    if verdict is None:
        raise NotFoundError("chat not found", "chat_not_found")
    return verdict.as_json()


@rest.get("/chat/<uuid:chat_id>/export")
@validate_querystring(s.ExportQuery)
@documented(s.ExportText, 200, 404)
async def export(chat_id: UUID, query_args: s.ExportQuery) -> Response:
    """The chat in an export format (``jsonl``: its event log, one event a line)."""
    svc = services()
    form = FORMATS.get(query_args.format)
    if form is None:
        raise BadRequestError(f"unknown format {query_args.format!r}: one of "
                              f"{', '.join(FORMATS)}", "unknown_format")
    await svc.require_chat(current_user(), chat_id)
    text = await svc.store.read(render, svc.store.app, chat_id, query_args.format)
    name = f"chat-{chat_id}.{form.extension}"
    return Response(text, content_type=form.media_type,
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@rest.get("/stats")
@validate_querystring(s.StatsQuery)
@documented(s.Stats, 200, 404)
async def stats(query_args: s.StatsQuery) -> dict[str, object]:
    """The caller's stats (or one chat's), and the live counts of this server."""
    owner, svc = current_user(), services()
    await svc.seen_own_writes()
    if query_args.chat_id is not None:
        if await svc.views.get_chat(owner, query_args.chat_id) is None:
            raise NotFoundError("chat not found", "chat_not_found")
    result = await svc.views.stats(owner, query_args.chat_id)
    counts = svc.system.counts()
    return {**result, "live": {"connections": svc.connections,
                               "active_chats": counts["active_chats"],
                               "generating": counts["generating"]}}


@rest.get("/health")
@document_response(s.Health, 200)
@document_response(s.Health, 503)
async def health() -> tuple[dict[str, object], int]:
    """Readiness, within ``HEALTH_TIMEOUT_S`` (or the store timeout, if shorter) whatever the
    database does: 200 ``ok`` when the store answers and the views keep up; 503
    ``unavailable`` when the store or the views do not answer; 503 ``degraded`` when the views
    fall behind or cannot be updated, a connection to PostgreSQL (the bus, the chat leases)
    is being made again, or a store call failed in the last ``FAILURE_MEMORY_S``; 200
    ``degraded`` when some events could not be projected. ``problems`` says why."""
    svc = services()
    settings = svc.settings
    body: dict[str, object] = {"status": "ok", "protocol": PROTOCOL_VERSION,
                               "store": settings.store_kind}
    answers = await _store_answers(svc, min(HEALTH_TIMEOUT_S, settings.store_timeout_s))
    if answers is None:
        body["status"] = "unavailable"
        body["error"] = {"code": "store_unavailable", "message": "the event store is unreachable"}
        return body, 503
    body["position"], skipped = answers
    problems = svc.updater.problems(settings.projection_max_lag, settings.projection_stall_s)
    problems.extend(svc.system.problems())
    failed = svc.store.recent_failure(FAILURE_MEMORY_S)
    if failed is not None:
        problems.append(failed)
    status = 503 if problems else 200
    if skipped:
        problems.append(f"{skipped} events could not be projected: see"
                        " `eventchat projections status`")
    if problems:
        body["status"] = "degraded"
        body["problems"] = problems
    body["projection_lag"] = svc.updater.lag
    body["skipped_events"] = skipped
    body.update(svc.system.counts())
    body["connections"] = svc.connections
    return body, status


async def _store_answers(svc: Services, deadline_s: float) -> tuple[int, int] | None:
    """The log's position and the count of skipped events, asked of both databases at once;
    None when either fails or does not answer within ``deadline_s`` (the worker threads
    still waiting are abandoned: a stuck database never holds the answer up)."""
    found: dict[str, int] = {}

    async def position() -> None:
        found["position"] = await svc.store.max_position()

    async def skipped() -> None:
        found["skipped"] = (await svc.views.skipped_events(0))[0]

    failed = False
    with trio.move_on_after(deadline_s):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(position)
                nursery.start_soon(skipped)
        except* (StoreError, ViewStoreError):
            failed = True
    if failed or len(found) < 2:
        return None
    return found["position"], found["skipped"]


class Liveness(BaseModel):
    status: Literal["alive", "stopping"]


@rest.get("/health/live")
@document_response(Liveness, 200)
@document_response(Liveness, 503)
async def live() -> tuple[dict[str, str], int]:
    """Liveness, for a process supervisor: 200 ``alive`` while the core tasks run (the actor
    system, the projection runner, the web server answering this), with no database call;
    503 ``stopping`` once one failed (the process is exiting) or the server has stopped."""
    svc: Services | None = current_app.extensions.get("eventchat")
    if svc is None or not svc.alive:
        return {"status": "stopping"}, 503
    return {"status": "alive"}, 200


@rest.record_once
def declare_metrics_token(state: BlueprintSetupState) -> None:
    """Declares the scraper's bearer token (``EVENTCHAT_METRICS_TOKEN``) beside the users'
    one in the OpenAPI document, as scheme ``metrics``."""
    schema = state.app.extensions.get("QUART_SCHEMA")
    if schema is not None and schema.security_schemes is not None:
        schema.security_schemes["metrics"] = HttpSecurityScheme(scheme="bearer")


@rest.get("/metrics")
@document_response(s.PrometheusText, 200)
@document_response(s.ErrorBody, 401)
@document_response(s.ErrorBody, 404)
@security_scheme([{"metrics": []}])
async def metrics() -> Response:
    """Prometheus text format, for the scraper holding ``EVENTCHAT_METRICS_TOKEN``.

    User tokens get 401; with no metrics token set, 404 (``EVENTCHAT_METRICS_BIND`` serves
    the same text without a token on a listener of its own).
    """
    svc = services()
    require_metrics_token(request, svc.settings.metrics_token)
    return Response(svc.metrics.render(), content_type=CONTENT_TYPE)
