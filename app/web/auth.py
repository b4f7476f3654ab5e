"""Bearer-token authentication for every route but the public ones.

``Authorization: Bearer <token>`` on every request; the WebSocket and the SSE follow
(``GET /chat/{id}/stream``) also accept ``?access_token=<token>`` (browsers cannot set
headers on a WebSocket or an ``EventSource``). A missing or unknown
token raises ``UnauthorizedError`` (401, and a refused WebSocket handshake). The user's name
is put in ``g.user``; routes read it with ``current_user()``.

``/metrics`` takes no user token: its route calls ``require_metrics_token``, which accepts only
the scraper's ``EVENTCHAT_METRICS_TOKEN`` (401 for any other token, 404 when none is set).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from quart import Quart, g, request, websocket
from quart.wrappers import Request, Websocket

from .errors import NotFoundError, UnauthorizedError
from .users import Authenticator

#: Endpoints anyone may call: the health checks, the contract itself, the web client.
PUBLIC_ENDPOINTS = frozenset({"rest.health", "rest.live", "openapi", "static", "index"})
#: Endpoints that check a token of their own rather than a user's.
OWN_TOKEN_ENDPOINTS = frozenset({"rest.metrics"})
NO_USER_TOKEN = PUBLIC_ENDPOINTS | OWN_TOKEN_ENDPOINTS
#: HTTP endpoints that also take the token as ``?access_token=`` (an ``EventSource``).
QUERY_TOKEN_ENDPOINTS = frozenset({"follow.stream"})
METRICS_OFF = (
    "/metrics is off on this port: set EVENTCHAT_METRICS_TOKEN and scrape with it as a bearer"
    " token, or set EVENTCHAT_METRICS_BIND to serve it on a listener of its own"
)


def bearer_token(conn: Request | Websocket, allow_query: bool = False) -> str | None:
    header = conn.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if allow_query:
        return conn.args.get("access_token") or None
    return None


async def authenticate(auth: Authenticator, token: str | None) -> str:
    if token is None:
        raise UnauthorizedError("missing bearer token")
    user = await auth.user_for(token)
    if user is None:
        raise UnauthorizedError("invalid bearer token")
    return user


def require_metrics_token(conn: Request, expected: str | None) -> None:
    """Raises ``NotFoundError`` when no metrics token is set, ``UnauthorizedError`` unless
    ``conn`` carries it (compared in constant time; user tokens are refused)."""
    if not expected:
        raise NotFoundError(METRICS_OFF)
    token = bearer_token(conn)
    if token is None:
        raise UnauthorizedError("missing metrics token")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise UnauthorizedError("invalid metrics token")


def current_user() -> str:
    user = g.get("user")
    if user is None:  # a route forgot to be protected: fail closed
        raise UnauthorizedError("not authenticated")
    return str(user)


def install_auth(app: Quart, auth: Callable[[], Authenticator]) -> None:
    """Checks the token before every non-public request and every WebSocket handshake."""

    @app.before_request
    async def check_request() -> None:
        if request.endpoint in NO_USER_TOKEN or request.method == "OPTIONS":
            return
        g.user = await authenticate(
            auth(), bearer_token(request, allow_query=request.endpoint in QUERY_TOKEN_ENDPOINTS)
        )

    @app.before_websocket
    async def check_websocket() -> None:
        g.user = await authenticate(auth(), bearer_token(websocket, allow_query=True))
