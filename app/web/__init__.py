"""The web layer: the Quart-Trio app (REST + WebSocket) and the Hypercorn server."""

from __future__ import annotations

from .app import create_app
from .server import serve
from .users import add_user, ensure_default_user

__all__ = ["add_user", "create_app", "ensure_default_user", "serve"]
