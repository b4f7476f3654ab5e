"""JSON from clients: request bodies and WebSocket frames, decoded in one place.

Whatever arrives (bytes that are not UTF-8, text that is not JSON, JSON nested deeper than
the parser's stack) becomes a ``BadRequestError`` with code ``invalid_json``: a 400 answer
or an ``error`` frame, never an unhandled exception.
"""

from __future__ import annotations

import json
from typing import Any

from quart_trio.wrappers.request import TrioRequest

from .errors import BadRequestError


def loads(raw: str | bytes | bytearray | None) -> object:
    """Parses untrusted JSON; raises ``BadRequestError`` (``invalid_json``) on any fault.

    ``None`` is what Quart hands over for an empty binary WebSocket frame.
    """
    if not raw:
        raise BadRequestError("the body is empty", "invalid_json")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequestError("the body is not valid UTF-8", "invalid_json") from None
    except RecursionError:
        raise BadRequestError("the JSON is nested too deeply", "invalid_json") from None
    except ValueError as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}", "invalid_json") from None


class Request(TrioRequest):
    """The app's request class: ``get_json`` parses with ``loads``.

    Quart decodes the body as text before parsing, and lets ``UnicodeDecodeError`` and
    ``RecursionError`` escape as unexpected errors; here the raw bytes are parsed instead.
    """

    async def get_json(
        self, force: bool = False, silent: bool = False, cache: bool = True
    ) -> Any:
        if cache and self._cached_json[silent] is not Ellipsis:
            return self._cached_json[silent]
        if not (force or self.is_json):
            return None
        data = await self.get_data(cache=cache, as_text=False)
        try:
            result = loads(data)
        except BadRequestError:
            if not silent:
                raise
            result = None
        if cache:
            self._cached_json[silent] = result
        return result
