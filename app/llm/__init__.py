"""Model providers (OpenAI-compatible, offline) and the tool registry.

``build_provider(settings)`` picks the provider named by ``settings.provider``;
``ModelRouter.build(settings)`` holds one provider per configured upstream and sends each
request to the one serving its model. The caller owns either and closes it with
``await provider.aclose()``.
"""

from __future__ import annotations

import httpx2

from app.config import Settings
from app.llm.base import Provider
from app.llm.offline import OfflineProvider
from app.llm.openai_provider import OpenAIProvider
from app.llm.router import ModelRouter
from app.llm.tools import ToolRegistry, default_registry

__all__ = [
    "ModelRouter",
    "OfflineProvider",
    "OpenAIProvider",
    "Provider",
    "ToolRegistry",
    "build_provider",
    "default_registry",
]


def build_provider(settings: Settings, http_client: httpx2.AsyncClient | None = None) -> Provider:
    """The provider for ``settings.provider`` (``http_client`` is used by ``openai`` only)."""
    if settings.provider == "openai":
        return OpenAIProvider(settings, http_client=http_client)
    if settings.provider == "offline":
        return OfflineProvider(settings)
    raise ValueError(f"unknown provider {settings.provider!r}")
