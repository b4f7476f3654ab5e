"""The web layer: the Quart-Trio app (REST + WebSocket) and the Hypercorn server."""

from __future__ import annotations

from .app import create_app
from .server import serve

__all__ = ["create_app", "serve"]
