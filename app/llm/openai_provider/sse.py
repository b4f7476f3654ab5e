"""The event-stream decoder of a streamed completion: the parsed ``data`` of each event."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

import httpx2
import trio

#: How long the end of a body may take to arrive after ``[DONE]`` (then it is closed).
DRAIN_TIMEOUT_S = 0.1


class StreamedError(Exception):
    """The server sent an error in place of a chunk."""


async def sse_data(response: httpx2.Response) -> AsyncGenerator[Any, None]:
    """The parsed ``data`` of each server-sent event, up to ``[DONE]``.

    Events follow the event-stream format: ``field: value`` lines, several ``data`` lines
    joined by newlines, comments (``:``) skipped, a blank line ending each event. An event
    named ``error``, or data carrying an ``error`` object, raises ``StreamedError`` (as the
    ``openai`` client does); data that is not JSON raises ``ValueError``. After ``[DONE]``
    the rest of the body is read briefly, as the client does, so that the connection goes
    back to the pool.
    """
    data: list[str] = []
    event = ""
    # ``aiter_lines`` is an async generator (typed as a plain iterator)
    async with aclosing(cast(AsyncGenerator[str, None], response.aiter_lines())) as lines:
        async for line in lines:
            if line:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
                continue
            if not data:
                event = ""
                continue
            text, name, data, event = "\n".join(data), event, [], ""
            if text.startswith("[DONE]"):
                with trio.move_on_after(DRAIN_TIMEOUT_S):
                    async for _ in lines:
                        pass
                return
            parsed = json.loads(text)
            error = parsed.get("error") if isinstance(parsed, dict) else None
            if error or name == "error":
                message = error.get("message") if isinstance(error, dict) else None
                raise StreamedError(message if isinstance(message, str) and message
                                    else "an error occurred during streaming")
            yield parsed
