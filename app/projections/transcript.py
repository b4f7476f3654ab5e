"""A chat's conversation as others read it: the OpenAI chat format, and Markdown.

Both are made from the chat's active branch as ``GET /chat/{id}`` shows it (the views'
rows, rebuilt from the log by ``timetravel``), and its system prompt from the log.

``openai_messages`` is what a model gets to continue the chat: the system prompt, each user
message, each reply's rounds of tool calls (an ``assistant`` message with the text streamed
before them and its ``tool_calls``, then one ``tool`` message per call with its result or
error, as the turn sent them to the model), then the reply's text after them. A reply still
streaming, and one that ended with no text and no tool call, are left out; so is a tool
call that never ended (a model refuses a call with no result).
Blocking (it reads the log).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any
from uuid import UUID

from ..events.application import ChatApplication
from ..events.domain import ChatSession
from ..events.replay import chat_events
from .rows import ChatRow, MessageRow
from .timetravel import active_branch, rows_of

OpenAIMessage = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Conversation:
    """A chat's row, system prompt and active branch, and where each tool call came in
    its reply's text: ``cuts[(response_id, call_id)]`` is the code point at which the model
    asked for it (text before it belongs with the call)."""

    chat: ChatRow
    system_prompt: str | None
    messages: list[MessageRow]
    cuts: dict[tuple[str, str], int]


def conversation(app: ChatApplication, chat_id: UUID) -> Conversation:
    """The chat's conversation, read from its log (``ChatNotFoundError``)."""
    events = chat_events(app, chat_id)
    chat, messages = rows_of(events)
    return Conversation(chat, system_prompt(events), active_branch(chat, messages),
                        tool_cuts(events))


def system_prompt(events: Sequence[ChatSession.Event]) -> str | None:
    prompt = None
    for event in events:
        if isinstance(event, ChatSession.Started | ChatSession.SystemPromptChanged):
            prompt = event.system_prompt
    return prompt


def tool_cuts(events: Sequence[ChatSession.Event]) -> dict[tuple[str, str], int]:
    written: dict[str, int] = {}
    cuts: dict[tuple[str, str], int] = {}
    for event in events:
        if isinstance(event, ChatSession.TokensGenerated):
            written[event.response_id] = event.offset + len(event.text)
        elif isinstance(event, ChatSession.ToolInvoked):
            cuts[(event.response_id, event.call_id)] = written.get(event.response_id, 0)
    return cuts


def openai_messages(talk: Conversation) -> list[OpenAIMessage]:
    prompt = talk.system_prompt
    out: list[OpenAIMessage] = [{"role": "system", "content": prompt}] if prompt else []
    for row in talk.messages:
        if row.role == "user":
            out.append({"role": "user", "content": row.content})
        elif row.status != "streaming":
            out.extend(_reply(row, talk.cuts))
    return out


def _reply(row: MessageRow, cuts: dict[tuple[str, str], int]) -> Iterator[OpenAIMessage]:
    """The reply as the model produced it: each round's text and tool calls (an assistant
    message with ``tool_calls``, then their results), then the text after the last one."""
    calls = [c for c in row.tool_calls or [] if c.get("duration_ms") is not None]
    text, start = row.content, 0
    for at, round_ in groupby(calls, key=lambda c: cuts.get((row.response_id or "",
                                                             c["call_id"]), 0)):
        asked = list(round_)
        cut = max(start, min(at, len(text)))
        yield {"role": "assistant", "content": text[start:cut] or None, "tool_calls": [
            {"id": c["call_id"], "type": "function",
             "function": {"name": c["tool"], "arguments": json.dumps(c["arguments"])}}
            for c in asked]}
        for c in asked:
            result = {"error": c["error"]} if c.get("error") is not None else c["result"]
            yield {"role": "tool", "tool_call_id": c["call_id"],
                   "content": json.dumps(result, ensure_ascii=False)}
        start = cut
    if text[start:]:
        yield {"role": "assistant", "content": text[start:]}


def openai(app: ChatApplication, chat_id: UUID) -> Iterator[str]:
    """``{"messages": [...]}`` in the OpenAI chat format, one JSON document on one line."""
    messages = openai_messages(conversation(app, chat_id))
    yield json.dumps({"messages": messages}, ensure_ascii=False) + "\n"


def markdown(app: ChatApplication, chat_id: UUID) -> Iterator[str]:
    """A readable transcript: the chat's title, system prompt, and each message with who
    wrote it and when, each reply's model, status, tool calls and error."""
    talk = conversation(app, chat_id)
    chat, prompt, messages = talk.chat, talk.system_prompt, talk.messages
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
