"""Several model servers behind one ``Provider``: each request goes to the server of its model.

``ModelRouter`` holds one provider per upstream of ``Settings.catalog()`` (OpenAI-compatible
servers, the offline generator) and sends ``stream(request)`` to the one that serves
``request.model``, so the turn code sees one provider whatever the configuration. A model
that no upstream lists (a chat recorded before the configuration changed) goes to the
default model's upstream, as it did when there was only one. ``for_model`` pins a provider
to one model, for a turn that answers with the model recorded when it started.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import replace

import httpx2

from ..config import Settings, Upstream
from .base import ModelRequest, Provider, StreamItem
from .offline import OfflineProvider
from .openai_provider import OpenAIProvider


class ModelRouter:
    """Dispatches each model call to the upstream serving its model."""

    name = "router"

    def __init__(self, settings: Settings, providers: Mapping[str, Provider]) -> None:
        self._default = settings.default_model
        self._providers = dict(providers)
        self._upstream_of = {m: u.name for u in settings.catalog() for m in u.models}

    @classmethod
    def build(cls, settings: Settings, http_client: httpx2.AsyncClient | None = None
              ) -> ModelRouter:
        """A router over a new provider for each upstream of ``settings.catalog()``."""
        return cls(settings, {u.name: _provider(settings, u, http_client)
                              for u in settings.catalog()})

    @property
    def default_model(self) -> str:
        return self._default

    def provider_of(self, model: str) -> str:
        """The name of the upstream that serves ``model`` (the default's, if none lists it)."""
        return self._upstream_of.get(model, self._upstream_of[self._default])

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[StreamItem]]:
        """The stream of the upstream serving ``request.model`` (the default model when
        None), which is asked for that model by name."""
        model = request.model or self._default
        provider = self._providers[self.provider_of(model)]
        return provider.stream(replace(request, model=model))

    def wrapped(self, wrap: Callable[[Provider], Provider]) -> ModelRouter:
        """This router with each upstream's provider seen through ``wrap`` (telemetry);
        closing either router closes the same providers."""
        router = copy.copy(self)
        router._providers = {name: wrap(p) for name, p in self._providers.items()}
        return router

    async def aclose(self) -> None:
        """Closes every upstream's provider."""
        for provider in self._providers.values():
            await provider.aclose()


class Pinned:
    """A provider that asks for ``model`` whatever the request names."""

    def __init__(self, provider: Provider, model: str) -> None:
        self.provider = provider
        self.model = model
        self.name = upstream_name(provider, model)

    @property
    def default_model(self) -> str:
        return self.model

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[StreamItem]]:
        return self.provider.stream(replace(request, model=self.model))

    async def aclose(self) -> None:
        """The pinned provider is its owner's to close."""


def for_model(provider: Provider, model: str) -> Provider:
    """``provider`` asking for ``model`` on every call (a turn's model, as recorded)."""
    return Pinned(provider, model)


def upstream_name(provider: Provider, model: str) -> str:
    """What ``ResponseStarted`` records as the provider of ``model``: its upstream's name."""
    if isinstance(provider, ModelRouter):
        return provider.provider_of(model)
    return provider.name


def _provider(settings: Settings, upstream: Upstream,
              http_client: httpx2.AsyncClient | None) -> Provider:
    if upstream.kind == "offline":
        return OfflineProvider(settings)
    own = settings.replace(openai_base_url=upstream.base_url, openai_api_key=upstream.api_key,
                           model=upstream.models[0])
    return OpenAIProvider(own, http_client=http_client)
