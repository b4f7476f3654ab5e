"""A chat's conversation as others read it: the OpenAI chat format, and Markdown.

Both are made from the chat's active branch as ``GET /chat/{id}`` shows it (the views'
rows, rebuilt from the log by ``timetravel``), and its system prompt from the log.

``openai_messages`` is what a model gets to continue the chat: the system prompt, each user
message, each reply's tool calls (an ``assistant`` message with ``tool_calls``, then one
``tool`` message per call with its result or error, as the turn sent them to the model), then
the reply's text. A reply still streaming, and one that ended with no text and no tool call,
are left out; so is a tool call that never ended (a model refuses a call with no result).
Blocking (it reads the log).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any
from uuid import UUID

from ..events.application import ChatApplication
from ..events.domain import ChatSession
from ..events.replay import chat_events
from .rows import ChatRow, MessageRow
from .timetravel import active_branch, rows_of

OpenAIMessage = dict[str, Any]


def conversation(app: ChatApplication, chat_id: UUID
                 ) -> tuple[ChatRow, str | None, list[MessageRow]]:
    """The chat's row, its system prompt and the messages of its active branch, in order
    (``ChatNotFoundError``)."""
    events = chat_events(app, chat_id)
    chat, messages = rows_of(events)
    return chat, system_prompt(events), active_branch(chat, messages)


def system_prompt(events: Sequence[ChatSession.Event]) -> str | None:
    prompt = None
    for event in events:
        if isinstance(event, ChatSession.Started | ChatSession.SystemPromptChanged):
            prompt = event.system_prompt
    return prompt


def openai_messages(prompt: str | None, messages: Sequence[MessageRow]) -> list[OpenAIMessage]:
    out: list[OpenAIMessage] = [{"role": "system", "content": prompt}] if prompt else []
    for row in messages:
        if row.role == "user":
            out.append({"role": "user", "content": row.content})
        elif row.status != "streaming":
            out.extend(_reply(row))
    return out


def _reply(row: MessageRow) -> Iterator[OpenAIMessage]:
    calls = [c for c in row.tool_calls or [] if c.get("duration_ms") is not None]
    if calls:
        yield {"role": "assistant", "content": None, "tool_calls": [
            {"id": c["call_id"], "type": "function",
             "function": {"name": c["tool"], "arguments": json.dumps(c["arguments"])}}
            for c in calls]}
        for c in calls:
            result = {"error": c["error"]} if c.get("error") is not None else c["result"]
            yield {"role": "tool", "tool_call_id": c["call_id"],
                   "content": json.dumps(result, ensure_ascii=False)}
    if row.content:
        yield {"role": "assistant", "content": row.content}


def openai(app: ChatApplication, chat_id: UUID) -> Iterator[str]:
    """``{"messages": [...]}`` in the OpenAI chat format, one JSON document on one line."""
    _, prompt, messages = conversation(app, chat_id)
    yield json.dumps({"messages": openai_messages(prompt, messages)}, ensure_ascii=False) + "\n"


def markdown(app: ChatApplication, chat_id: UUID) -> Iterator[str]:
    """A readable transcript: the chat's title, system prompt, and each message with who
    wrote it and when, each reply's model, status, tool calls and error."""
    chat, prompt, messages = conversation(app, chat_id)
    yield f"# {chat.title}\n\n"
    yield f"Chat `{chat.chat_id}`, started {chat.created_at}, last activity {chat.updated_at}.\n\n"
    if prompt:
        yield "**System prompt**\n\n" + _quoted(prompt) + "\n"
    for row in messages:
        yield _message(row)


def _message(row: MessageRow) -> str:
    if row.role == "user":
        return f"## User · seq {row.seq} · {row.created_at}\n\n{row.content}\n\n"
    head = f"## Assistant · seq {row.seq} · {row.created_at} · {row.model or 'unknown model'}"
    if row.status != "complete":
        head += f" · **{row.status}**"
    parts = [head + "\n\n"]
    for c in row.tool_calls or []:
        outcome = (f"error: {c['error']}" if c.get("error") is not None
                   else f"→ `{json.dumps(c.get('result'), ensure_ascii=False)}`")
        parts.append(f"- tool `{c['tool']}`(`{json.dumps(c['arguments'], ensure_ascii=False)}`)"
                     f" {outcome}\n")
    if row.tool_calls:
        parts.append("\n")
    if row.content:
        parts.append(row.content + "\n\n")
    if row.error:
        parts.append(f"> error `{row.error.get('code')}`: {row.error.get('message')}\n\n")
    if row.usage:
        parts.append(f"_{row.usage.get('total_tokens', 0)} tokens_\n\n")
    return "".join(parts)


def _quoted(text: str) -> str:
    return "".join(f"> {line}\n" for line in text.splitlines()) or "> \n"
