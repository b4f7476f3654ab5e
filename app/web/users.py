"""Token checks of a running server, over the user store (``app.storage.users``).

A running server trusts a token it has checked for ``TOKEN_CACHE_S`` seconds: a revoked
token is refused (401, and a refused WebSocket handshake) within that time by every server
sharing the table; WebSocket connections it opened before stay open until they close.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from ..events.errors import StoreUnavailableError
from ..storage.users import UserStore, hash_token

#: Seconds a running server trusts a token it has checked (a revocation's longest delay).
TOKEN_CACHE_S = 5.0
T = TypeVar("T")


class Authenticator:
    """Async token checks; a known token is trusted for ``ttl_s`` seconds without asking the
    store again, so a revoked one is refused at most ``ttl_s`` after its row is deleted.
    Unknown tokens are never cached. A store that does not answer within ``timeout_s``
    raises ``StoreUnavailableError`` (its worker thread is abandoned)."""

    MAX_CACHED = 10_000

    def __init__(self, users: UserStore, limiter: trio.CapacityLimiter | None = None,
                 ttl_s: float = TOKEN_CACHE_S, timeout_s: float | None = None) -> None:
        self.users = users
        self.limiter = limiter or trio.CapacityLimiter(4)
        self.ttl_s = ttl_s
        self.timeout_s = users.settings.store_timeout_s if timeout_s is None else timeout_s
        #: token hash -> (user name, trio clock time until which it is trusted)
        self._known: dict[str, tuple[str, float]] = {}

    async def user_for(self, token: str) -> str | None:
        """The user holding ``token``, or None; store failures raise ``StoreUnavailableError``."""
        digest, now = hash_token(token), trio.current_time()
        cached = self._known.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        name = await self.run(self.users.authenticate, token)
        if name is None:
            self._known.pop(digest, None)
            return None
        if len(self._known) >= self.MAX_CACHED:
            self._known = {k: v for k, v in self._known.items() if v[1] > now}
        if len(self._known) < self.MAX_CACHED:
            self._known[digest] = (name, now + self.ttl_s)
        return name

    async def run(self, fn: Callable[[str], T], arg: str) -> T:
        """Runs a read of the user store, bounded by ``timeout_s`` (abandoned after it)."""
        with trio.move_on_after(self.timeout_s):
            return await trio.to_thread.run_sync(fn, arg, limiter=self.limiter,
                                                 abandon_on_cancel=True)
        raise StoreUnavailableError(
            f"user store unavailable: no answer within {self.timeout_s:g} s"
        )
