"""Export formats of a chat's log: ``GET /chat/{id}/export?format=...`` and
``eventchat export --format ...`` both render through ``FORMATS``.

Each format renders one chat (blocking: the web layer runs it in a worker thread) as an
iterator of text chunks. ``jsonl`` is the event log as ``GET /chat/{id}/events`` gives it,
one event a line, each with its ``chat_id`` and the bytes its audit link covers
(``stored``: the topic and the base64 of the state as stored), so that the chain can be
checked without eventchat (docs/audit.md, docs/verify_chain.py). ``openai`` is
``{"messages": [...]}`` of the chat in the OpenAI chat format and ``markdown`` a readable
transcript (``app.projections.transcript``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from uuid import UUID

from ..projections import transcript
from .application import ChatApplication
from .replay import chat_records


@dataclass(frozen=True, slots=True)
class Format:
    """How one export format is served and rendered."""

    media_type: str
    extension: str
    render: Callable[[ChatApplication, UUID], Iterator[str]]


def jsonl(app: ChatApplication, chat_id: UUID) -> Iterator[str]:
    """The chat's events, one JSON object a line. Raises ``ChatNotFoundError``."""
    for record in chat_records(app, chat_id, stored=True):
        yield json.dumps({"chat_id": str(chat_id), **record}) + "\n"


#: Every export format, by the name ``format=`` takes.
FORMATS: dict[str, Format] = {
    "jsonl": Format("application/x-ndjson", "jsonl", jsonl),
    "openai": Format("application/json", "json", transcript.openai),
    "markdown": Format("text/markdown; charset=utf-8", "md", transcript.markdown),
}


def render(app: ChatApplication, chat_id: UUID, name: str) -> str:
    """The whole export of one chat in format ``name`` (one of ``FORMATS``)."""
    return "".join(FORMATS[name].render(app, chat_id))
