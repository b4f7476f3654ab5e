"""Full-text search of a user's own messages and chat titles, and the ``search_chats`` tool.

SQLite uses FTS5 (porter stemming); PostgreSQL a generated ``tsvector`` with a GIN index
queried by ``websearch_to_tsquery`` (English stemming). Chats whose title contains every
word match too. Results never leave ``owner``'s chats: every query filters on it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypedDict

from ..llm.base import ToolContext, ToolSpec
from ..llm.tools import ToolRegistry
from ..storage.sql import Tx

if TYPE_CHECKING:
    from .views import Views

SNIPPETS_PER_CHAT = 3
_WORD = re.compile(r"\w+", re.UNICODE)

_SQLITE_QUERY = (
    "SELECT chat_id, seq, role, snippet(view_search, 0, '**', '**', '…', 16)"
    " FROM view_search WHERE view_search MATCH ? AND owner = ? ORDER BY rank LIMIT ?"
)
_POSTGRES_QUERY = (
    "SELECT chat_id, seq, role,"
    " ts_headline('english', content, query, 'StartSel=**, StopSel=**, MaxWords=24, MinWords=8')"
    " FROM view_search, websearch_to_tsquery('english', ?) AS query"
    " WHERE owner = ? AND tsv @@ query ORDER BY ts_rank(tsv, query) DESC, chat_id, seq LIMIT ?"
)


class Snippet(TypedDict):
    """A matching message: its seq, its role, and its words around the match."""

    seq: int
    role: str
    snippet: str


def search_rows(tx: Tx, owner: str, q: str, limit: int) -> list[tuple[str, list[Snippet]]]:
    """(chat id, snippets) of ``owner``'s best matches for ``q``, at most ``limit`` chats."""
    words = _WORD.findall(q)
    if not words:
        return []
    if tx.postgres:
        rows = tx.all(_POSTGRES_QUERY, (q, owner, limit * 10))
    else:
        match = " ".join('"' + w.replace('"', "") + '"' for w in words)
        rows = tx.all(_SQLITE_QUERY, (match, owner, limit * 10))
    chats: dict[str, list[Snippet]] = {}
    for chat_id, seq, role, snippet in rows:
        snippets = chats.setdefault(chat_id, [])
        if len(snippets) < SNIPPETS_PER_CHAT:
            snippets.append({"seq": int(seq), "role": role, "snippet": snippet})
    for chat_id in _title_matches(tx, owner, words, limit):
        chats.setdefault(chat_id, [])
    return list(chats.items())[:limit]


def _title_matches(tx: Tx, owner: str, words: list[str], limit: int) -> list[str]:
    clauses = " AND ".join("lower(title) LIKE ? ESCAPE '!'" for _ in words)
    patterns = ["%" + re.sub(r"([!%_])", r"!\1", w.lower()) + "%" for w in words]
    rows = tx.all(
        f"SELECT chat_id FROM view_chats WHERE owner = ? AND {clauses}"
        " ORDER BY updated_at DESC LIMIT ?",
        (owner, *patterns, limit),
    )
    return [row[0] for row in rows]


SEARCH_SPEC = ToolSpec(
    name="search_chats",
    description="Search the user's own earlier chats and messages; returns matching chats "
    "with snippets of the matching messages.",
    parameters={
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "words or a quoted phrase"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 20, "default": 5},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
)


def register_search_tool(registry: ToolRegistry, views: Views) -> None:
    """Registers ``search_chats``, which searches only the calling user's (``context.owner``)
    chats."""

    async def search_chats(arguments: dict[str, object], context: ToolContext) -> object:
        query = str(arguments.get("query", ""))
        limit = arguments.get("limit", 5)
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else 5
        results = await views.search(context.owner, query, max(1, min(limit, 20)))
        return {
            "results": [
                {"chat_id": r["chat"]["id"], "title": r["chat"]["title"],
                 "updated_at": r["chat"]["updated_at"], "snippets": r["snippets"]}
                for r in results
            ]
        }

    registry.register(SEARCH_SPEC, search_chats)
