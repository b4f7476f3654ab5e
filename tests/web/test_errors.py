"""Errors of the other layers as a client sees them."""

from __future__ import annotations

from app.events.errors import FencedError, StoreUnavailableError
from app.web.errors import web_error


def test_a_write_refused_by_the_fence_is_a_503_to_retry_not_a_store_outage() -> None:
    moved = web_error(FencedError("the lease of chat x was taken over"))
    assert moved is not None and (moved.status, moved.code) == (503, "owner_lost")
    assert moved.headers() == {"Retry-After": "1"}
    down = web_error(StoreUnavailableError("no route to host"))
    assert down is not None and (down.status, down.code) == (503, "store_unavailable")
