"""What the app needs between it and Hypercorn's trio worker to keep HTTP/1.1 connections sound.

``KeepAliveMiddleware(app)`` wraps the QuartTrio app for Hypercorn (``serve`` does it), so
that an idle keep-alive connection is closed after ``keep_alive_timeout`` and an answer
given before the request body has arrived never leaves the connection wedged.
``use_json_error_responses()`` gives the errors Hypercorn answers itself, before any
request reaches the app (400 malformed request, 431 headers too large), the contract's JSON
body instead of an empty one.

Why the middleware is needed (Hypercorn 0.18, quart-trio 0.12): Hypercorn ends a request
*inside the app's last ``send``* (``http.response.body`` without ``more_body``). Within
that call it writes the end of the response, queues ``http.disconnect`` for the app, and
then either restarts the connection's keep-alive timer (``Updated(idle=True)``) or, when
the request body has not all arrived, closes the connection (``Closed()``). QuartTrio's
``TrioASGIHTTPConnection`` runs a receive task beside the response task in one nursery,
and that task cancels the nursery as soon as it sees ``http.disconnect``. The
cancellation reaches the response task while it is still in that ``send``, at Hypercorn's
next checkpoint: the keep-alive timer is never restarted (the connection stays open until
the client leaves), and the close never happens (the next request on it is never read:
Hypercorn's reader waits forever for a cycle that was not started). The middleware shields
that last ``send``, so Hypercorn's bookkeeping runs to its end, and it adds
``Connection: close`` to an answer that starts before the whole request body was received
(an early 401, say): Hypercorn then closes the connection after the answer instead of
reading the rest of an unwanted body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from http import HTTPStatus
from itertools import chain
from typing import Any, cast

import h11
import trio
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

log = logging.getLogger(__name__)

#: The contract's code and message for each error Hypercorn answers by itself.
PROTOCOL_ERRORS = {
    400: ("invalid_request", "malformed HTTP request"),
    431: ("headers_too_large", "request headers too large"),
}
_HTTP1 = frozenset({"1.0", "1.1"})


class KeepAliveMiddleware:
    """Passes every scope to ``app``. For HTTP/1 requests it shields the last response
    message from cancellation, and it adds ``Connection: close`` to an answer that starts
    before the request body has ended.

    The shield covers only Hypercorn's own work of ending the response. Hypercorn already
    shields the socket write itself. A cancellation of the app is delayed until that work
    is done and then takes effect as usual.
    """

    def __init__(self, app: ASGIFramework) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or scope["http_version"] not in _HTTP1:
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(scope["headers"], receive, send)
        await self.app(scope, exchange.receive, exchange.send)


class _Exchange:
    """One request and its answer, seen from the app's side of ``receive`` and ``send``."""

    def __init__(
        self, headers: Iterable[tuple[bytes, bytes]], receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        self._receive = receive
        self._send = send
        self.body_received = not _has_body(headers)

    async def receive(self) -> ASGIReceiveEvent:
        message = await self._receive()
        fields = cast(dict[str, Any], message)
        if message["type"] == "http.disconnect" or not fields.get("more_body", False):
            self.body_received = True
        return message

    async def send(self, message: ASGISendEvent) -> None:
        fields = cast(dict[str, Any], message)
        if message["type"] == "http.response.start" and not self.body_received:
            headers = list(fields.get("headers", ()))
            if not any(name.lower() == b"connection" for name, _ in headers):
                headers.append((b"connection", b"close"))
            message = cast(ASGISendEvent, {**fields, "headers": headers})
        if message["type"] == "http.response.body" and not fields.get("more_body", False):
            with trio.CancelScope(shield=True):
                await self._send(message)
        else:
            await self._send(message)


def _has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the request announces a body (HTTP/1.1 framing: RFC 9112, section 6.3)."""
    for name, value in headers:
        name = bytes(name).lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def use_json_error_responses() -> None:
    """Makes Hypercorn's own HTTP/1.1 error answers carry the contract's JSON error body.

    Hypercorn writes them (with ``Connection: close``) when h11 refuses what the client
    sent, before there is a request for the app; it has no setting for their body. This
    replaces ``H11Protocol._send_error_response`` (Hypercorn 0.17 and 0.18), for the whole
    process; calling it again changes nothing. If a later Hypercorn no longer has that
    method, nothing is replaced and a warning is logged (tests/web/test_keepalive.py fails).
    """
    if not callable(getattr(H11Protocol, "_send_error_response", None)):
        log.warning("this Hypercorn has no H11Protocol._send_error_response: "
                    "its own error answers keep their empty body")
        return
    H11Protocol._send_error_response = _send_json_error_response  # type: ignore[method-assign]


async def _send_json_error_response(self: H11Protocol, status_code: int) -> None:
    code, message = _describe(status_code)
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await self._send_h11_event(h11.Response(
        status_code=status_code,
        headers=list(chain(headers, self.config.response_headers("h11"))),
    ))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


def _describe(status_code: int) -> tuple[str, str]:
    if status_code in PROTOCOL_ERRORS:
        return PROTOCOL_ERRORS[status_code]
    try:
        phrase = HTTPStatus(status_code).phrase
    except ValueError:
        phrase = "error"
    return phrase.lower().replace(" ", "_"), phrase.lower()
