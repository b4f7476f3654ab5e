"""The rules every text of a chat obeys, wherever it comes from.

Text reaches the log from people (titles, messages, system prompts, model names, message
ids: REST bodies, query strings, WebSocket frames) and from models (streamed text, tool
names and arguments, error messages). Two kinds of character are never stored:

- U+0000 (NUL): PostgreSQL's ``text`` and ``jsonb`` refuse it, so one such event would stop
  every view that reads it;
- lone surrogates (U+D800 to U+DFFF outside a pair): they are not Unicode scalar values,
  have no UTF-8 encoding, and cannot be written by the event store at all.

What a person sends is *checked* (``text_problem`` / ``check_text``): refused whole, with
a message naming the field and the position. What a model sends is *cleaned*
(``clean_text`` / ``clean_json``): each such character becomes U+FFFD, one code point for
one, so offsets stay exact, and the cleaned text is what is recorded and shown.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from .errors import InvalidTextError

REPLACEMENT = "\ufffd"
_FORBIDDEN = re.compile("[\x00\ud800-\udfff]")

T = TypeVar("T")


def text_problem(value: str) -> str | None:
    """Why ``value`` may not be stored, or None when it may."""
    if value.isascii() and "\x00" not in value:
        return None
    found = _FORBIDDEN.search(value)
    if found is None:
        return None
    char = found.group()
    what = "a NUL character (U+0000)" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    return f"contains {what} at position {found.start()}"


def check_text(value: str, field: str) -> str:
    """Returns ``value``, or raises ``InvalidTextError`` naming ``field`` if it holds a
    character that is never stored."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidTextError(f"{field} {problem}")
    return value


def clean_text(value: str) -> str:
    """``value`` with every NUL and lone surrogate replaced by U+FFFD (same length)."""
    if value.isascii() and "\x00" not in value:
        return value
    return _FORBIDDEN.sub(REPLACEMENT, value)


def clean_json(value: T) -> T:
    """A JSON value with ``clean_text`` applied to every string in it, keys included.

    Iterative, so that a deeply nested value cannot exhaust the stack.
    """
    if isinstance(value, str):
        return clean_text(value)  # type: ignore[return-value]  # a str, cleaned
    if not isinstance(value, dict | list):
        return value
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]
    while stack:
        parent, key, item = stack.pop()
        if isinstance(item, dict):
            copy: Any = {}
            for k, v in item.items():
                copy[clean_text(k) if isinstance(k, str) else k] = None
                stack.append((copy, clean_text(k) if isinstance(k, str) else k, v))
        elif isinstance(item, list):
            copy = [None] * len(item)
            stack.extend((copy, i, v) for i, v in enumerate(item))
        elif isinstance(item, str):
            copy = clean_text(item)
        else:
            copy = item
        parent[key] = copy
    return root[0]  # type: ignore[no-any-return]  # a copy of value, of its type
