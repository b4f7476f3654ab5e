"""The model router: each call goes to the upstream serving its model, asked for it by name."""

from __future__ import annotations

from app.config import Settings, Upstream
from app.llm.base import ModelRequest, TextDelta
from app.llm.router import ModelRouter, for_model, upstream_name
from tests.actors.conftest import ScriptedProvider

SETTINGS = Settings(model="b-1", upstreams=(
    Upstream("a", "openai", ("a-1", "a-2"), "http://127.0.0.1:1/v1"),
    Upstream("b", "openai", ("b-1",), "http://127.0.0.1:2/v1"),
))


async def text_of(provider: object, request: ModelRequest) -> str:
    async with provider.stream(request) as items:  # type: ignore[attr-defined]
        return "".join([item.text async for item in items if isinstance(item, TextDelta)])


async def test_each_call_goes_to_the_upstream_of_its_model() -> None:
    a, b = ScriptedProvider(), ScriptedProvider()
    router = ModelRouter(SETTINGS, {"a": a, "b": b})
    hello = [{"role": "user", "content": "hi"}]
    for model in ("a-2", None, "a-1", "retired-model"):
        await text_of(router, ModelRequest(hello, model=model))
    await text_of(for_model(router, "a-1"), ModelRequest(hello, model="b-1"))

    # no model: the default; a model no upstream lists (an old chat's): the default's upstream
    assert [r.model for r in a.requests] == ["a-2", "a-1", "a-1"]
    assert [r.model for r in b.requests] == ["b-1", "retired-model"]
    assert router.default_model == "b-1"
    assert [upstream_name(router, m) for m in ("a-1", "b-1", "x")] == ["a", "b", "b"]
    assert upstream_name(a, "anything") == "scripted"


async def test_the_router_builds_and_closes_a_provider_per_upstream() -> None:
    router = ModelRouter.build(SETTINGS.replace(upstreams=(
        *SETTINGS.upstreams, Upstream("offline", "offline", ("offline",)))))
    try:
        text = await text_of(router, ModelRequest([{"role": "user", "content": "hello"}],
                                                  model="offline"))
    finally:
        await router.aclose()
    assert text
