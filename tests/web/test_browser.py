"""The web client in a real headless Chromium, against the real server.

Playwright's sync API runs its own event loop, so the server runs on a trio loop of its own
in a thread (as in ``test_openapi_fuzz``) and the tests are plain functions. Without
``/usr/bin/chromium`` (or the ``playwright`` package) they are skipped with the reason,
unless ``EVENTCHAT_REQUIRE_BROWSER=1`` (set by CI), where they fail instead.

Tests that need replies of a given shape (markdown, a failure) put the server in front of the
fake OpenAI-compatible upstream (``tests/fakes/openai_server.py``), on the same trio loop.
Screenshots go to ``$EVENTCHAT_ARTIFACTS`` (else the test's ``tmp_path``) and are copied to
``/tmp/eventchat-screenshots/``.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.fakes.openai_server import (
    Behaviour,
    ErrorReply,
    StreamReply,
    echo_reply,
)

from .conftest import Server, server_in_thread, web_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
WAIT_MS = 20_000
SCREENSHOTS = Path("/tmp/eventchat-screenshots")


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
def upstream() -> str | None:
    """The fake upstream's answers (a key of ``UPSTREAMS``); None: the offline model."""
    return None


#: Markdown the fake upstream streams in ``test_markdown_replies``.
MARKDOWN_REPLY = """Here is **a table**:

| Name | Value |
|:-----|------:|
| alpha | 1 |
| beta | 22 |

```python
def greet(name):
    return f"hello {name}"  # <b>not bold</b>
```

Read [the guide](https://example.com/guide) for more."""


def markdown_reply(body: dict[str, Any]) -> Behaviour:
    """Streams ``MARKDOWN_REPLY`` in small pieces, with no usage (so it is estimated)."""
    pieces = [MARKDOWN_REPLY[i:i + 9] for i in range(0, len(MARKDOWN_REPLY), 9)]
    return StreamReply(pieces, usage=False, delay_s=0.01)


def failing_once(trigger: str) -> Callable[[dict[str, Any]], Behaviour]:
    """Fails the first request whose last message contains ``trigger``; echoes otherwise."""
    failed: list[bool] = []

    def answer(body: dict[str, Any]) -> Behaviour:
        last = str(body["messages"][-1].get("content"))
        if trigger in last and not failed:
            failed.append(True)
            return ErrorReply(500, "the upstream fell over")
        return echo_reply(body)

    return answer


def numbered() -> Callable[[dict[str, Any]], Behaviour]:
    """Answers "answer 1", "answer 2", ... in turn (a regenerate shows a new text)."""
    count = itertools.count(1)
    return lambda body: StreamReply([f"answer {next(count)}"])


UPSTREAMS: dict[str, Callable[[], Any]] = {
    "markdown": lambda: markdown_reply,
    "fails_once": lambda: failing_once("please fail"),
    "numbered": numbered,
}


@pytest.fixture
def browser_server(settings: Settings, server_changes: dict[str, Any],
                   upstream: str | None) -> Iterator[Server]:
    """The real server, on a trio loop in a thread, with visibly streamed replies."""
    reason = browser_missing()
    if reason is not None:
        if os.environ.get("EVENTCHAT_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    changed = web_settings(settings, **{"offline_token_delay_s": 0.01, **server_changes})
    default = None if upstream is None else UPSTREAMS[upstream]()
    with server_in_thread(changed, default) as server:
        yield server


@pytest.fixture
def browser(browser_server: Server) -> Iterator[Any]:
    """Headless Chromium (after the server: it is closed before the server stops)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      args=CHROMIUM_ARGS)
        expect.set_options(timeout=WAIT_MS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextmanager
def watched(tab: Any) -> Iterator[Any]:
    """``tab``, whose JavaScript errors fail the test."""
    tab.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield tab
    assert errors == []


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh desktop-sized Chromium page, allowed to use the clipboard."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    with watched(context.new_page()) as tab:
        yield tab
    context.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: ``$EVENTCHAT_ARTIFACTS`` or the test's own directory."""
    path = Path(os.environ.get("EVENTCHAT_ARTIFACTS") or tmp_path / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(page: Any, artifacts: Path, name: str) -> None:
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, SCREENSHOTS / path.name)


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


def test_chat_tools_history_and_stop(browser_server: Server, page: Any, artifacts: Path) -> None:
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
    expect(page.locator("#stats-body")).to_contain_text("TTFT")
    tools = page.locator("#stats-body .stats-group", has_text="Tools")
    expect(tools).to_contain_text("calculator")
    expect(tools).to_contain_text("1 call · 0 errors")
    expect(page.locator(".message.assistant .tool").first).to_contain_text(
        re.compile(r"completed in (0\.\d*[1-9]\d*|[1-9]\d*(\.\d+)?) ms"))  # never "0 ms"
    screenshot(page, artifacts, "chat-tools-stats")


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
    expect(page.locator("#log-check")).to_be_visible()  # a mark, without its words
    page.screenshot(path=str(tmp_path / "narrow.png"))
    shutil.copyfile(tmp_path / "narrow.png", SCREENSHOTS / "narrow.png")

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
    expect(page.locator("#chat-list li")).to_contain_text("zebra")
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


#: Starts with an emoji; has mathematical letters, an accent, a ZWJ family and a flag. Its
#: 57th UTF-16 unit is the first half of 🙂: a title cut there by UTF-16 length is refused.
ASTRAL = "😀 héllo 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 test 👩\u200d👩\u200d👧 a tiny bit longer 🙂 done 🇫🇷"

#: Installed in every document: reports the last reply's text on every change.
RECORD_REPLY = """(() => {
    const sample = () => {
        const texts = document.querySelectorAll('.message.assistant .text');
        if (texts.length) window.recordReplyText(texts[texts.length - 1].textContent);
    };
    document.addEventListener('DOMContentLoaded', () => new MutationObserver(sample)
        .observe(document.body, {childList: true, characterData: true, subtree: true}));
})()"""


def chat_id_of(page: Any) -> str:
    return str(page.url.rsplit("#", 1)[1])


@pytest.mark.parametrize("server_changes", [{"offline_token_delay_s": 0.06}])
def test_astral_text_streams_and_resumes_by_code_points(
        browser_server: Server, page: Any, artifacts: Path) -> None:
    """Offsets count code points: every text shown, live and after a reload mid-stream, is
    a prefix of the stored reply, and a first message starting with an emoji titles the chat."""
    from playwright.sync_api import expect

    server = browser_server
    states: list[str] = []
    page.expose_function("recordReplyText", lambda text: states.append(text))
    page.add_init_script(RECORD_REPLY)
    open_client(page, server)
    send(page, ASTRAL)
    expect(page.locator("#alert")).to_be_hidden()
    expect(page.locator("#chat-title")).to_have_text(ASTRAL)
    reply = page.locator(".message.assistant").first
    expect(reply.locator(".text")).to_contain_text("You said: \"😀 héllo 𝔘𝔫𝔦")
    expect(reply.locator(".state")).to_have_text("streaming…")
    live = len(states)
    page.reload()
    expect(reply.locator(".state")).to_have_text("complete")
    screenshot(page, artifacts, "astral-stream")

    chat_id = chat_id_of(page)
    final = stored_messages(server, chat_id)[-1]["content"]
    assert ASTRAL in final
    assert reply.locator(".text").evaluate("node => node.textContent") == final
    shown = [text for i, text in enumerate(states) if i == 0 or states[i - 1] != text]
    assert live >= 3 and len(states) - live >= 5  # it streamed before and after the reload
    assert [text for text in shown if not final.startswith(text)] == []
    expect(page.locator("#chat-list button").first).to_contain_text(ASTRAL)


@pytest.mark.parametrize("upstream", ["markdown"])
def test_markdown_replies(browser_server: Server, page: Any, artifacts: Path) -> None:
    """A streamed markdown reply: a table, a highlighted code block that copies, a safe link,
    and usage the model did not report marked as estimated."""
    from playwright.sync_api import expect

    open_client(page, browser_server)
    send(page, "show me some markdown")
    reply = page.locator(".message.assistant").first
    expect(reply.locator(".state")).to_have_text("complete")
    text = reply.locator(".text")
    expect(text.locator("strong")).to_have_text("a table")
    expect(text.locator("table thead th")).to_have_text(["Name", "Value"])
    expect(text.locator("table tbody tr")).to_have_count(2)
    expect(text.locator("table tbody tr").nth(1).locator("td")).to_have_text(["beta", "22"])
    code = text.locator(".code-block pre code")
    expect(code).to_have_class(re.compile(r"\blanguage-python\b"))
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(code).to_contain_text("<b>not bold</b>")  # text in code, not markup
    expect(text.locator("b")).to_have_count(0)
    link = text.get_by_role("link", name="the guide")
    expect(link).to_have_attribute("href", "https://example.com/guide")
    expect(link).to_have_attribute("rel", re.compile(r"\bnoopener\b"))
    expect(link).to_have_attribute("target", "_blank")
    expect(reply.locator(".usage")).to_contain_text("≈")
    assert "```" not in text.inner_text()

    text.get_by_role("button", name="Copy code").click()
    expect(text.get_by_role("button", name="Copied")).to_have_attribute("data-copied", "yes")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.rstrip("\n") == (
        'def greet(name):\n    return f"hello {name}"  # <b>not bold</b>')
    screenshot(page, artifacts, "markdown")

    page.click("#stats summary")
    models = page.locator("#stats-body .stats-group", has_text="Models")
    expect(models).to_contain_text("fake-model")
    expect(models).to_contain_text("1 response · ")


HOSTILE = ('__bold__ <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script> '
           '[click](javascript:window.__pwned=3) zebra')


def test_hostile_text_runs_nothing_and_search_jumps_to_it(
        browser_server: Server, page: Any, artifacts: Path) -> None:
    """Markup in a reply, a title and a search snippet is shown as text (markdown still
    renders), and a search hit scrolls to its message and highlights it."""
    from playwright.sync_api import expect

    server = browser_server
    open_client(page, server)
    send(page, HOSTILE)
    reply = page.locator(".message.assistant").first
    expect(reply.locator(".state")).to_have_text("complete")
    expect(reply.locator(".text strong")).to_have_text("bold")
    expect(reply.locator(".text")).to_contain_text('<img src=x onerror="window.__pwned=1">')
    expect(reply.locator(".text")).to_contain_text("<script>window.__pwned=2</script>")
    expect(page.locator("#chat-title")).to_contain_text("<img src=x onerror=")
    reply.locator(".text a", has_text="click").click()

    chat_id = chat_id_of(page)
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=20) as c:
        for n in range(8):
            c.post("/generate", json={"message": f"/tokens 60 filler {n}", "chat_id": chat_id})
    expect(page.locator(".message")).to_have_count(18)
    page.fill("#search-input", "zebra")
    hit = page.locator("#chat-list .chat-snippet").first
    expect(hit.locator("mark").first).to_have_text(re.compile("zebra", re.I))
    expect(hit).to_contain_text("<script>window.__pwned=2</script>")
    assert "**zebra**" not in hit.inner_text()
    seq = hit.get_attribute("data-seq")
    target = page.locator(f'.message[data-seq="{seq}"]')
    expect(target).not_to_be_in_viewport()
    hit.click()
    expect(target).to_have_class(re.compile(r"\bhit\b"))
    expect(target).to_be_in_viewport()
    screenshot(page, artifacts, "hostile-and-search")

    counts = page.evaluate("""() => ({
        img: document.querySelectorAll('img').length,
        inline_script: document.querySelectorAll('script:not([src])').length,
        handlers: document.querySelectorAll('[onerror], [onclick], [onload]').length,
        js_links: document.querySelectorAll('a[href^="javascript"]').length,
        pwned: typeof window.__pwned,
    })""")
    assert counts == {"img": 0, "inline_script": 0, "handlers": 0, "js_links": 0,
                      "pwned": "undefined"}


@pytest.mark.parametrize("upstream", ["fails_once"])
def test_a_failed_reply_on_a_phone_shows_its_code_and_retries(
        browser_server: Server, browser: Any, artifacts: Path) -> None:
    """On a phone: Enter is a new line and the button sends; a failed reply's error is
    scrolled into view with its code, and Retry sends the question again."""
    from playwright.sync_api import expect

    server = browser_server
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=20) as c:
        chat_id = c.post("/generate", json={"message": "a first question"}).json()["chat_id"]
        for n in range(5):
            words = " ".join(f"word{n}{k}" for k in range(40))
            c.post("/generate", json={"message": f"question {n}: {words}", "chat_id": chat_id})
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                  has_touch=True, device_scale_factor=2)
    with watched(context.new_page()) as phone:
        phone.goto(f"{server.base_url}/?token={server.tokens['alice']}#{chat_id}")
        expect(phone.locator("#connection")).to_have_attribute("data-state", "open")
        expect(phone.locator(".message")).to_have_count(12)
        phone.fill("#composer-input", "please fail")
        phone.press("#composer-input", "Enter")
        expect(phone.locator("#composer-input")).to_have_value("please fail\n")
        expect(phone.locator(".message")).to_have_count(12)
        phone.tap("#send")

        failed = phone.locator(".message.assistant").nth(6)
        expect(failed.locator(".state")).to_have_text("failed")
        code = stored_messages(server, chat_id)[-1]["error"]["code"]
        error = failed.locator(".reply-error")
        expect(error.locator(".error-code")).to_have_text(code)
        expect(error).to_contain_text("the upstream fell over")
        expect(error).to_be_in_viewport()
        screenshot(phone, artifacts, "phone-failed-reply")

        error.get_by_role("button", name="Retry").tap()
        answer = phone.locator(".message.assistant").nth(7)
        expect(answer.locator(".state")).to_have_text("complete")
        expect(answer.locator(".text")).to_have_text("You said: please fail")
        expect(phone.locator(".message.user").nth(7).locator(".text")).to_have_text("please fail")
        expect(answer).to_be_in_viewport()
        screenshot(phone, artifacts, "phone-retried")
    context.close()


def test_keyboard_only(browser_server: Server, page: Any, artifacts: Path) -> None:
    """Shortcuts to send, stop, start a chat and search; a visible focus; a list of them."""
    from playwright.sync_api import expect

    open_client(page, browser_server)
    expect(page.locator("#composer-input")).to_be_focused()  # ready to type
    page.keyboard.press("Tab")
    focused = page.evaluate("""() => ({id: document.activeElement.id,
        outline: getComputedStyle(document.activeElement).outlineStyle})""")
    assert focused == {"id": "send", "outline": "solid"}  # the focus shows
    page.keyboard.press("Shift+Tab")
    expect(page.locator("#composer-input")).to_be_focused()
    page.keyboard.type("/slow")
    page.keyboard.press("Enter")
    reply = page.locator(".message.assistant").first
    expect(reply.locator(".state")).to_have_text("streaming…")
    page.keyboard.press("Escape")
    expect(reply.locator(".state")).to_have_text("stopped")

    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    page.keyboard.press("Control+Enter")
    expect(page.locator(".message.user .text").nth(1)).to_have_text("first line\nsecond line")
    expect(page.locator(".message.assistant .state").nth(1)).to_have_text("complete")

    page.keyboard.press("Control+k")
    expect(page.locator("#search-input")).to_be_focused()
    page.keyboard.press("Shift+Escape")
    expect(page.locator("#composer-input")).to_be_focused()
    page.keyboard.press("Alt+n")
    expect(page.locator("#chat-title")).to_have_text("New chat")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#composer-input")).to_be_focused()

    page.locator("#messages").focus()
    page.keyboard.press("?")
    panel = page.locator("#shortcuts .shortcuts-panel")
    expect(panel).to_be_visible()
    for shortcut in ("Esc", "Enter", "Alt", "K"):
        expect(panel).to_contain_text(shortcut)
    screenshot(page, artifacts, "keyboard-shortcuts")
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()
    expect(page.locator("#shortcuts summary")).to_be_focused()


@pytest.mark.parametrize("server_changes", [{"max_tokens": 5}])
def test_a_reply_cut_by_the_token_limit_says_so(
    browser_server: Server, page: Any, artifacts: Path
) -> None:
    from playwright.sync_api import expect

    open_client(page, browser_server)
    send(page, "/tokens 50")
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-status", "complete")
    expect(reply.locator(".text")).to_have_text("lorem ipsum dolor sit amet")
    expect(reply.locator(".reply-cut")).to_be_visible()
    screenshot(page, artifacts, "cut-by-max-tokens")
    page.reload()
    expect(page.locator(".message.assistant").last.locator(".reply-cut")).to_be_visible()
    send(page, "/tokens 3")  # a reply that ended on its own has no such note
    expect(page.locator(".message.assistant")).to_have_count(2)
    last = page.locator(".message.assistant").last
    expect(last).to_have_attribute("data-status", "complete")
    expect(last.locator(".reply-cut")).to_be_hidden()


def test_rename_delete_and_the_log_check(browser_server: Server, page: Any,
                                         artifacts: Path) -> None:
    from playwright.sync_api import expect

    server = browser_server
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=20) as c:
        chat_id = c.post("/generate", json={"message": "plans for the trip"}).json()["chat_id"]
    page.goto(f"{server.base_url}/?token={server.tokens['alice']}#{chat_id}")
    expect(page.locator("#log-check")).to_have_text("✓ log verified")
    page.click("#rename-chat")
    expect(page.locator("#rename-input")).to_have_value("plans for the trip")
    page.fill("#rename-input", "Lisbon in May")
    page.press("#rename-input", "Enter")
    expect(page.locator("#chat-title")).to_have_text("Lisbon in May")
    expect(page.locator("#chat-list button")).to_contain_text("Lisbon in May")
    assert stored_chat(server, chat_id)["title"] == "Lisbon in May"
    page.click("#delete-chat")
    expect(page.locator("#delete-dialog")).to_contain_text("“Lisbon in May”")
    screenshot(page, artifacts, "delete-confirmation")
    page.click("#delete-dialog [data-close]")  # cancelled: nothing happens
    expect(page.locator("#delete-dialog")).to_be_hidden()
    assert stored_chat(server, chat_id)["title"] == "Lisbon in May"
    page.click("#delete-chat")
    page.click("#delete-confirm")
    expect(page.locator("#chat-list-empty")).to_be_visible()
    expect(page.locator("#chat-title")).to_have_text("New chat")
    expect(page.locator("#chat-actions")).to_be_hidden()
    r = httpx.get(f"{server.base_url}/chat/{chat_id}", headers=server.headers(), timeout=10)
    assert r.status_code == 404


def stored_chat(server: Server, chat_id: str) -> dict[str, Any]:
    r = httpx.get(f"{server.base_url}/chat/{chat_id}", headers=server.headers(), timeout=10)
    r.raise_for_status()
    return dict(r.json()["chat"])


@pytest.mark.parametrize("server_changes", [{"approval_tools": ("calculator",)}])
def test_a_tool_call_asks_for_approval_again_after_a_reload(
    browser_server: Server, page: Any, artifacts: Path
) -> None:
    from playwright.sync_api import expect

    open_client(page, browser_server)
    send(page, "what is 6*7")
    ask = page.locator(".message.assistant .tool .approval")
    expect(ask).to_contain_text("Run calculator?")
    expect(page.locator(".message.assistant .tool")).to_contain_text('{"expression":"6*7"}')
    screenshot(page, artifacts, "tool-approval")

    page.reload()  # asked again on subscribe, while the call waits
    expect(ask).to_be_visible()
    ask.get_by_role("button", name="Approve").click()
    reply = page.locator(".message.assistant").first
    expect(reply.locator(".tool")).to_have_attribute("data-status", "completed")
    expect(reply.locator(".text")).to_contain_text("42")
    expect(ask).to_have_count(0)

    send(page, "what is 2*3")
    second = page.locator(".message.assistant").nth(1)
    second.locator(".approval-reason").fill("not now")
    second.get_by_role("button", name="Deny").click()
    expect(second.locator(".tool")).to_contain_text("denied: not now")
    expect(second.locator(".state")).to_have_text("complete")


@pytest.mark.parametrize("upstream", ["numbered"])
def test_edit_regenerate_alternatives_and_fork(browser_server: Server, page: Any,
                                               artifacts: Path) -> None:
    from playwright.sync_api import expect

    server = browser_server
    open_client(page, server)
    send(page, "first question")
    replies = page.locator(".message.assistant .text")
    expect(replies).to_have_text(["answer 1"])
    send(page, "second question")
    expect(replies).to_have_text(["answer 1", "answer 2"])
    chat_id = page.url.rsplit("#", 1)[1]

    last = page.locator(".message.assistant").nth(1)
    last.get_by_role("button", name="Answer again").click()
    expect(replies).to_have_text(["answer 1", "answer 3"])
    expect(last.locator(".siblings span")).to_have_text("2/2")
    last.get_by_role("button", name="Previous alternative").click()
    expect(replies).to_have_text(["answer 1", "answer 2"])
    expect(last.locator(".siblings span")).to_have_text("1/2")
    expect(last.get_by_role("button", name="Previous alternative")).to_be_disabled()

    page.locator(".message.user").first.get_by_role("button", name="Edit this message").click()
    expect(page.locator("#composer-input")).to_have_value("first question")
    send(page, "first question, edited")
    expect(page.locator(".message.user .text")).to_have_text(["first question, edited"])
    expect(replies).to_have_text(["answer 4"])
    expect(page.locator(".message.user .siblings span")).to_have_text("2/2")
    screenshot(page, artifacts, "branches")
    assert [m["content"] for m in stored_messages(server, chat_id)] == [
        "first question, edited", "answer 4"]

    page.fill("#search-input", "second")  # a hit on the other branch switches to it
    page.locator("#chat-list .chat-snippet").first.click()
    expect(page.locator(".message.user .text")).to_have_text(["first question",
                                                             "second question"])
    expect(replies).to_have_text(["answer 1", "answer 3"])  # its newest deepest descendant
    expect(page.locator(".message.user.hit .text")).to_have_text("second question")
    page.fill("#search-input", "")
    page.locator(".message.user").first.get_by_role(  # the question and its answer
        "button", name="Continue from here in a new chat").click()
    expect(page.locator("#chat-list button")).to_have_count(2)
    expect(page).not_to_have_url(re.compile(chat_id))
    expect(page.locator(".message.user .text")).to_have_text(["first question"])
    expect(replies).to_have_text(["answer 1"])
    send(page, "only in the fork")
    expect(replies).to_have_text(["answer 1", "answer 5"])
    assert len(stored_messages(server, chat_id)) == 4  # the original: untouched


def test_the_replay_player_and_the_exports(browser_server: Server, page: Any,
                                           artifacts: Path) -> None:
    from playwright.sync_api import expect

    server = browser_server
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=20) as c:
        chat_id = c.post("/generate", json={"message": "what is 12*7"}).json()["chat_id"]
        c.post("/generate", json={"message": "/fail", "chat_id": chat_id})
        log = c.get(f"/chat/{chat_id}/events").json()["events"]
    head = log[-1]["seq"]
    batch = next(e for e in log if e["type"] == "TokensGenerated")
    page.goto(f"{server.base_url}/?token={server.tokens['alice']}#{chat_id}")
    expect(page.locator(".message.assistant")).to_have_count(2)
    page.click("#replay-chat")
    player = page.locator("#player")
    expect(page.locator("#player-at")).to_have_text(f"seq {head} of {head}: ResponseFailed")
    expect(player.locator(".player-message.assistant").last).to_have_attribute(
        "data-status", "failed")

    # the scrubber: the chat as it was right after the first batch of text
    page.eval_on_selector("#player-scrub", """(el, seq) => {
        el.value = String(seq); el.dispatchEvent(new Event("input")); }""", batch["seq"])
    expect(page.locator("#player-at")).to_have_text(
        f"seq {batch['seq']} of {head}: TokensGenerated")
    streaming = player.locator(".player-message.assistant")
    expect(streaming).to_have_count(1)
    expect(streaming).to_have_attribute("data-status", "streaming")
    expect(streaming.locator(".player-text")).to_have_text(batch["data"]["text"])
    expect(streaming.locator(".player-tools")).to_contain_text(
        '⚙ calculator({"expression":"12*7"}) → 84')

    # play from the start, paced as the model streamed it; the live view is untouched
    page.eval_on_selector("#player-scrub", """el => {
        el.value = "0"; el.dispatchEvent(new Event("input")); }""")
    page.select_option("#player-speed", "2")
    page.click("#player-play")
    expect(page.locator("#player-play")).to_have_text("Pause")
    expect(player.locator(".player-message.user").first).to_contain_text("what is 12*7")
    screenshot(page, artifacts, "replay-player")
    expect(page.locator("#player-play")).to_have_text("Play")
    expect(page.locator("#player-at")).to_have_text(f"seq {head} of {head}: ResponseFailed")
    replies = player.locator(".player-message.assistant")
    expect(replies).to_have_count(2)
    expect(replies.first).to_have_attribute("data-status", "complete")
    expect(replies.first.locator(".player-text")).to_have_text("12*7 = 84.")
    expect(replies.last).to_have_attribute("data-status", "failed")
    expect(page.locator(".message.assistant")).to_have_count(2)

    page.click("#export-menu summary")
    with page.expect_download() as download:
        page.click("[data-export='markdown']")
    text = Path(download.value.path()).read_text()
    assert download.value.suggested_filename == f"chat-{chat_id}.md"
    assert "## User · seq 2" in text and "calculator" in text and "**failed**" in text
    page.click("#player-close")
    expect(player).to_be_hidden()
