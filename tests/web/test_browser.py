"""The web client in a real headless Chromium, against the real server.

Playwright's sync API runs its own event loop, so the server runs on a trio loop of its own
in a thread (as in ``test_openapi_fuzz``) and the tests are plain functions. Without
``/usr/bin/chromium`` (or the ``playwright`` package) they are skipped with the reason,
unless ``EVENTCHAT_REQUIRE_BROWSER=1`` (set by CI), where they fail instead.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings

from .conftest import Server, server_in_thread, web_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
WAIT_MS = 20_000


def browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install playwright)"
    return None


@pytest.fixture
def store_kind() -> str:
    """The page does not care about the store: SQLite only."""
    return "sqlite"


@pytest.fixture
def server_changes() -> dict[str, Any]:
    """Settings a test changes (by parametrizing this)."""
    return {}


@pytest.fixture
def browser_server(settings: Settings, server_changes: dict[str, Any]) -> Iterator[Server]:
    """The real server, on a trio loop in a thread, with visibly streamed replies."""
    reason = browser_missing()
    if reason is not None:
        if os.environ.get("EVENTCHAT_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    changed = web_settings(settings, offline_token_delay_s=0.01, **server_changes)
    with server_in_thread(changed) as server:
        yield server


@pytest.fixture
def page(browser_server: Server) -> Iterator[Any]:
    """A fresh Chromium page; JavaScript errors on it fail the test."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 760})
            tab.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            yield tab
            assert errors == []
        finally:
            browser.close()


#: Records every text the node shows (to see a resumed stream never double anything).
RECORD_TEXTS = """node => {
    window.recordedTexts = [node.textContent];
    new MutationObserver(() => window.recordedTexts.push(node.textContent))
        .observe(node, {childList: true, characterData: true, subtree: true});
}"""


def open_client(page: Any, server: Server) -> None:
    from playwright.sync_api import expect

    page.goto(f"{server.base_url}/?token={server.tokens['alice']}")
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")


def send(page: Any, text: str) -> None:
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")


def stored_messages(server: Server, chat_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{server.base_url}/chat/{chat_id}", headers=server.headers(), timeout=10)
    r.raise_for_status()
    return list(r.json()["messages"])


def test_chat_tools_history_and_stop(browser_server: Server, page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    server = browser_server
    open_client(page, server)
    assert "token" not in page.url  # taken out of the address bar...
    stored = page.evaluate("localStorage.getItem('eventchat.token')")
    assert stored == server.tokens["alice"]  # ...and kept for the next visit

    send(page, "what is 12*7")
    question = page.locator(".message.user").first
    expect(question.locator(".text")).to_have_text("what is 12*7")
    expect(question.locator(".state")).to_have_text("sent")
    reply = page.locator(".message.assistant").first
    expect(reply.locator(".tool")).to_contain_text("calculator")
    expect(reply.locator(".tool")).to_contain_text('{"expression":"12*7"}')
    expect(reply.locator(".tool")).to_contain_text("84")
    expect(reply.locator(".text")).to_contain_text("84")
    expect(reply.locator(".state")).to_have_text("complete")
    expect(reply.locator(".usage")).to_contain_text(re.compile(r"offline · \d+ tokens .*tok/s"))
    expect(page.locator("#composer-input")).to_have_value("")

    chat = page.locator("#chat-list button")
    expect(chat).to_have_count(1)
    expect(chat).to_contain_text("what is 12*7")
    expect(chat).to_have_attribute("aria-current", "true")
    chat_id = page.url.rsplit("#", 1)[1]
    assert [m["role"] for m in stored_messages(server, chat_id)] == ["user", "assistant"]

    page.reload()
    expect(page.locator(".message.user .text")).to_have_text(["what is 12*7"])
    expect(page.locator(".message.assistant .text")).to_contain_text(["84"])
    expect(page.locator(".message.assistant .tool")).to_contain_text("calculator")
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")

    send(page, "/slow")
    slow = page.locator(".message.assistant").nth(1)
    expect(slow.locator(".state")).to_have_text("streaming…")
    expect(slow.locator(".text")).to_have_attribute("aria-live", "polite")
    expect(slow.locator(".text")).to_have_text(re.compile(r"\w+ \w+ \w+"))
    page.click("#stop")
    expect(slow.locator(".state")).to_have_text("stopped")
    expect(page.locator("#stop")).to_be_hidden()
    stopped = stored_messages(server, chat_id)[-1]
    assert stopped["status"] == "stopped"
    expect(slow.locator(".text")).to_have_text(stopped["content"])

    page.click("#stats summary")
    expect(page.locator("#stats-body")).to_contain_text("TTFT p50")
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)


def test_a_dropped_connection_resumes_the_reply_exactly(browser_server: Server, page: Any) -> None:
    """The socket is cut mid-reply: the page reconnects and rebuilds it from offsets."""
    from playwright.sync_api import expect

    server = browser_server
    routes: list[Any] = []

    def through(ws: Any) -> None:
        ws.connect_to_server()
        routes.append(ws)

    page.route_web_socket(re.compile(r"/ws/chat"), through)
    open_client(page, server)
    send(page, "/tokens 300")
    reply = page.locator(".message.assistant").first
    expect(reply.locator(".text")).to_have_text(re.compile(r"(\w+ ){20}"))
    reply.locator(".text").evaluate(RECORD_TEXTS)
    expect(reply.locator(".state")).to_have_text("streaming…")
    routes[-1].close(code=1011, reason="cut by the test")
    expect(page.locator("#connection")).not_to_have_attribute("data-state", "open")
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    expect(reply.locator(".state")).to_have_text("complete")
    chat_id = page.url.rsplit("#", 1)[1]
    answer = stored_messages(server, chat_id)[-1]
    assert answer["usage"]["completion_tokens"] == 300
    expect(reply.locator(".text")).to_have_text(answer["content"])
    assert len(routes) >= 2
    texts = page.evaluate("window.recordedTexts")
    assert len(texts) > 10  # it went on streaming after the reconnect...
    assert all(answer["content"].startswith(t) for t in texts)  # ...never doubling text
    expect(page.locator(".message")).to_have_count(2)


@pytest.mark.parametrize("server_changes", [{"messages_per_minute": 1}])
def test_narrow_window_and_rate_limit_error(browser_server: Server, page: Any,
                                            tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 380, "height": 700})
    open_client(page, browser_server)
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    send(page, "hello there")
    expect(page.locator(".message.assistant .state")).to_have_text("complete")
    send(page, "and again")
    expect(page.locator("#alert")).to_contain_text("Slow down")
    rejected = page.locator(".message.user").nth(1)
    expect(rejected.locator(".state")).to_have_text("not sent")
    expect(rejected.get_by_role("button", name="Retry")).to_be_visible()
    page.screenshot(path=str(tmp_path / "narrow.png"))

    page.click("#toggle-sidebar")
    expect(page.locator("#toggle-sidebar")).to_have_attribute("aria-expanded", "true")
    expect(page.locator("#chat-list button")).to_contain_text("hello there")
    page.click("#new-chat")
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#chat-title")).to_have_text("New chat")


def test_search_and_older_pages(browser_server: Server, page: Any) -> None:
    from playwright.sync_api import expect

    server = browser_server
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=20) as c:
        chat_id = c.post("/generate", json={"message": "/tokens 1 first of many"}).json()["chat_id"]
        for n in range(25):
            c.post("/generate", json={"message": f"/tokens 1 number {n}", "chat_id": chat_id})
        c.post("/generate", json={"message": "a zebra crossing"})
    page.goto(f"{server.base_url}/?token={server.tokens['alice']}#{chat_id}")
    expect(page.locator(".message")).to_have_count(50)
    expect(page.locator(".message.user .text").first).to_have_text("/tokens 1 number 0")
    page.click("#load-older")
    expect(page.locator(".message")).to_have_count(52)
    expect(page.locator(".message.user .text").first).to_have_text("/tokens 1 first of many")
    expect(page.locator("#load-older")).to_be_hidden()

    expect(page.locator("#chat-list button")).to_have_count(2)
    page.fill("#search-input", "zebra")
    expect(page.locator("#chat-list button")).to_have_count(1)
    expect(page.locator("#chat-list button")).to_contain_text("zebra")
    page.fill("#search-input", "")
    expect(page.locator("#chat-list button")).to_have_count(2)


async def test_the_page_is_public_and_locked_down(server: Server) -> None:
    async with server.client(user=None) as c:
        index = await c.get("/", params={"token": "not-checked-here"})
        assert index.status_code == 200 and "text/html" in index.headers["content-type"]
        assert index.headers["Referrer-Policy"] == "no-referrer"
        assert "default-src 'self'" in index.headers["Content-Security-Policy"]
        for name in ("app.js", "style.css"):
            asset = await c.get(f"/static/{name}")
            assert asset.status_code == 200 and f"/static/{name}" in index.text
        assert "text/javascript" in (await c.get("/static/app.js")).headers["content-type"]
        assert "http" not in index.text.replace('http-equiv', '')  # no external assets
        assert (await c.get("/chats")).status_code == 401
        assert "/" not in (await c.get("/openapi.json")).json()["paths"]
