"""``eventchat chat``, the terminal client: driven through a pseudo-terminal (``pexpect``)
against a real ``eventchat serve``, with piped input, and its parts alone (the conversation
state rebuilt from frames, the screen, the URL, the input line)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from rich.console import Console

from app.terminal import (
    CUT_NOTE,
    Conversation,
    LineEditor,
    PlainView,
    Reply,
    TerminalView,
    UsageError,
    block_boundary,
    parse_target,
)

from .test_process_crash import free_port

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_]|\][^\x07]*\x07)")
CHAT_ID = re.compile(r"chat ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTCHAT_", "OPENAI_"))}
    env.update(EVENTCHAT_DATA_DIR=str(data_dir), EVENTCHAT_PROVIDER="offline",
               EVENTCHAT_OFFLINE_TOKEN_DELAY_S="0.005", PYTHONUNBUFFERED="1",
               TERM="xterm-256color", COLUMNS="100", LINES="30")
    return env


class Server:
    """A real ``eventchat serve`` on ``port``, with its data in ``data_dir``."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.env = base_env(data_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"server-{port}.log"

    def add_user(self, name: str) -> str:
        done = subprocess.run([sys.executable, "-m", "app.cli", "users", "add", name],
                              env=self.env, capture_output=True, text=True, check=True)
        return done.stdout.strip().splitlines()[-1]

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    running = Server(tmp_path_factory.mktemp("terminal") / "data", free_port())
    token = running.add_user("tess")
    running.start()
    yield running, token
    running.stop()


def chat(*args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    """``eventchat chat ARGS`` in a pseudo-terminal of 100 x 30."""
    return pexpect.spawn(sys.executable, ["-m", "app.cli", "chat", *args],
                         env=env or base_env(Path("unused")), dimensions=(30, 100),
                         encoding="utf-8", timeout=15)


def visible(text: str) -> list[str]:
    """The non-empty lines of a terminal's output, without escape sequences."""
    return [line.strip() for line in ANSI.sub("", text).replace("\r", "\n").split("\n")
            if line.strip()]


def ended(child: pexpect.spawn) -> tuple[int | None, str]:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, str(child.before)


# -- in a pseudo-terminal, against a real server ---------------------------------------------

def test_banner_streamed_reply_and_history(server: tuple[Server, str]) -> None:
    running, token = server
    # an http:// URL with no path is taken as the server's WebSocket
    child = chat("--token", token, "--url", f"http://127.0.0.1:{running.port}")
    child.expect("eventchat chat")
    child.expect("your first message starts it")
    child.expect("/stop or Ctrl-C")
    child.sendline("what is 12*7")
    child.expect(CHAT_ID)
    chat_id = child.match.group(1)
    child.expect(r"\[calculator: 84\]")
    child.expect(r"12\*7 = 84\.")
    child.expect("tokens")
    child.sendline("/quit")
    status, _ = ended(child)
    assert status == 0

    again = chat("--token", token, "--url", f"ws://127.0.0.1:{running.port}/ws/chat",
                 "--chat-id", chat_id)
    again.expect(f"chat {chat_id}")
    again.expect("what is 12\\*7")  # the history, before anything is typed
    again.expect(r"12\*7 = 84\.")
    again.sendline("and 6*7?")
    again.expect(r"6\*7 = 42\.")
    again.sendcontrol("d")
    status, _ = ended(again)
    assert status == 0


def test_ctrl_c_stops_the_reply_and_a_second_one_leaves(server: tuple[Server, str]) -> None:
    running, token = server
    child = chat("--token", token, "--url", f"127.0.0.1:{running.port}")
    child.expect("your first message starts it")
    child.sendline("/slow")
    child.expect("lorem ipsum dolor")
    child.send("kept aside")  # typed while the reply streams, not entered yet
    time.sleep(0.2)
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.send("\r")  # what was typed meanwhile is still there, and goes now
    child.expect('You said: "kept aside"')
    child.expect("tokens")
    child.sendline("/slow")
    child.expect("lorem ipsum dolor")
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.sendintr()  # nothing runs: leaves
    status, _ = ended(child)
    assert status == 0


def test_reconnects_after_a_server_restart_and_goes_on(tmp_path: Path) -> None:
    running = Server(tmp_path / "data", free_port())
    token = running.add_user("rey")
    running.start()
    try:
        child = chat("--token", token, "--url", f"ws://127.0.0.1:{running.port}/ws/chat")
        child.expect("your first message starts it")
        child.sendline("what is 12*7")
        child.expect(r"12\*7 = 84\.")
        child.expect("tokens")
        running.stop(signal.SIGTERM)
        child.expect("the server is shutting down: connecting again")
        child.expect("connection refused")
        running.start()
        child.expect("connected again", timeout=20)
        child.sendline("what is 6*7")
        child.expect(r"6\*7 = 42\.")
        child.expect("tokens")
        child.sendline("/quit")
        status, output = ended(child)
        assert status == 0
        assert "Traceback" not in output
    finally:
        running.stop()


@pytest.mark.parametrize("problem", ["bad token", "refused"])
def test_a_connection_problem_is_one_line(server: tuple[Server, str], problem: str) -> None:
    running, token = server
    if problem == "bad token":
        args, line = (["--token", "not-a-token", "--url", f"127.0.0.1:{running.port}"],
                      "eventchat chat: the server refused the token (401)")
    else:
        port = free_port()
        args, line = (["--token", token, "--url", f"ws://127.0.0.1:{port}/ws/chat"],
                      f"eventchat chat: cannot connect to 127.0.0.1:{port}: connection refused")
    status, output = ended(chat(*args))
    assert status == 1
    lines = visible(output)
    assert len(lines) == 1 and lines[0].startswith(line), lines


# -- not a terminal ----------------------------------------------------------------------------

def run_chat(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "chat", *args], input=stdin,
                          env=base_env(Path("unused")), capture_output=True, text=True,
                          timeout=30, check=False)


def test_piped_lines_make_a_conversation(server: tuple[Server, str]) -> None:
    running, token = server
    done = run_chat("--token", token, "--url", f"127.0.0.1:{running.port}",
                    stdin="what is 12*7\nsay **hello**\n")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout  # plain text when the output is not a terminal
    lines = done.stdout.splitlines()
    assert lines[:4] == ["> what is 12*7", "[calculator: 84]", "12*7 = 84.", "> say **hello**"]
    assert lines[4].startswith('You said: "say **hello**"')
    assert CHAT_ID.search(done.stderr)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--url", "ws://nosuchhost.invalid:8000/ws/chat"], 1,
     "cannot find host 'nosuchhost.invalid'"),
    (["--url", "ftp://127.0.0.1:8000"], 2, "is not a WebSocket URL: use ws://HOST:PORT/ws/chat"),
    (["--chat-id", "not-a-chat"], 2, "--chat-id 'not-a-chat' is not a chat id"),
])
def test_bad_input_is_one_line(args: list[str], code: int, message: str) -> None:
    done = run_chat("--token", "t", *args)
    assert done.returncode == code
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_no_token_and_an_unknown_chat(server: tuple[Server, str]) -> None:
    running, token = server
    done = run_chat("--url", f"127.0.0.1:{running.port}")
    assert done.returncode == 2 and "a token is needed" in done.stderr
    unknown = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
    done = run_chat("--token", token, "--url", f"127.0.0.1:{running.port}", "--chat-id", unknown)
    assert done.returncode == 1
    assert done.stderr == f"eventchat chat: no chat {unknown} (or it belongs to another user)\n"


# -- the parts -------------------------------------------------------------------------------

class Recorder:
    """A view that records what it was asked to show."""

    status = ""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.text: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any) -> None:
            if name == "reply_text":
                self.text[args[0].response_id] = self.text.get(args[0].response_id, "") + args[1]
            self.calls.append((name, args))
        return record


def delta(text: str, offset: int, rid: str = "r1") -> dict[str, Any]:
    return {"event": "ai_response", "chat_id": "c", "response_id": rid, "delta": text,
            "offset": offset, "done": False}


def test_a_reply_is_rebuilt_by_offset_across_a_reconnect() -> None:
    view = Recorder()
    conversation = Conversation(view)
    conversation.message("hi")
    [sent] = conversation.ready()
    conversation.receive({"event": "ack", "chat_id": "c", "seq": 2,
                          "client_message_id": sent["client_message_id"]})
    conversation.receive(delta("Hello", 0))
    conversation.receive(delta(" wor", 5))
    assert conversation.busy
    # the connection is lost; the new one resumes after the last settled seq
    assert conversation.on_connect() == [{"event": "subscribe", "chat_id": "c", "after_seq": 0}]
    # the text so far again, from offset 0, then what follows
    conversation.receive(delta("Hello wor", 0))
    conversation.receive(delta("ld", 9))
    conversation.receive(delta("ld", 9))  # the same twice: nothing doubled
    conversation.receive({"event": "ai_response", "chat_id": "c", "response_id": "r1",
                          "message": "Hello world!", "done": True, "status": "complete",
                          "seq": 7})
    assert view.text["r1"] == "Hello world!"
    conversation.receive({"event": "chat_history", "chat_id": "c", "has_more": False,
                          "last_seq": 7, "messages": [
                              {"seq": 2, "role": "user", "content": "hi"},
                              {"seq": 3, "role": "assistant", "response_id": "r1",
                               "content": "Hello world!", "status": "complete"}]})
    assert not conversation.busy
    assert [name for name, _ in view.calls if name in ("reply_done", "past_reply",
                                                       "user_message")] == ["reply_done"]
    assert conversation.on_connect()[0]["after_seq"] == 7


def test_a_reply_that_ended_while_disconnected_is_finished_from_the_history() -> None:
    view = Recorder()
    conversation = Conversation(view, chat_id="c")
    conversation.receive({"event": "chat_history", "chat_id": "c", "has_more": False,
                          "last_seq": 4, "messages": [
                              {"seq": 2, "role": "user", "content": "go"},
                              {"seq": 3, "role": "assistant", "response_id": "r1",
                               "content": "", "status": "streaming"}]})
    conversation.receive(delta("abc", 0))
    conversation.receive(delta("def", 3))
    # the server went away; the reply ended as interrupted with the text it had stored
    conversation.on_connect()
    conversation.receive({"event": "chat_history", "chat_id": "c", "has_more": False,
                          "last_seq": 9, "messages": [
                              {"seq": 3, "role": "assistant", "response_id": "r1",
                               "content": "abcdefgh", "status": "interrupted"}]})
    assert view.text["r1"] == "abcdefgh"
    done = [args[0] for name, args in view.calls if name == "reply_done"]
    assert [(r.text, r.status) for r in done] == [("abcdefgh", "interrupted")]
    assert not conversation.busy


def test_messages_wait_for_the_chat_their_first_one_creates() -> None:
    conversation = Conversation(Recorder())
    conversation.message("one")
    conversation.message("two")
    first = conversation.ready()
    assert [f["message"] for f in first] == ["one"] and "chat_id" not in first[0]
    assert conversation.ready() == []
    conversation.receive({"event": "ack", "chat_id": "c", "seq": 2,
                          "client_message_id": first[0]["client_message_id"]})
    [second] = conversation.ready()
    assert second["message"] == "two" and second["chat_id"] == "c"


def test_a_finished_reply_is_rendered_as_markdown() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=60, height=20, highlight=False)
    view = TerminalView(console, LineEditor())
    reply = Reply("r1", text="Some **bold** words and `code`.", status="complete")
    view.reply_text(reply, reply.text)
    assert out.getvalue() == ""  # still streaming: in the live region only
    view.reply_done(reply)
    shown = out.getvalue()
    assert "\x1b[1mbold" in shown and "**" not in shown and "`" not in shown

    plain = io.StringIO()
    PlainView(plain, io.StringIO()).past_reply(reply)
    assert plain.getvalue() == "Some **bold** words and `code`.\n"


def test_a_reply_taller_than_the_screen_prints_its_finished_paragraphs() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=40, height=12, highlight=False)
    view = TerminalView(console, LineEditor())
    reply = Reply("r1")
    paragraphs = [f"Paragraph {n} with **strong** words " * 3 for n in range(6)]
    for paragraph in paragraphs:
        reply.text += paragraph + "\n\n"
        view.reply_text(reply, paragraph)
    view.reply_done(reply)
    shown = " ".join(ANSI.sub("", out.getvalue()).split())
    assert "**" not in shown
    for n in range(6):
        assert shown.count(f"Paragraph {n} ") == 3  # each once, rendered


def test_block_boundary_leaves_code_fences_whole() -> None:
    assert block_boundary("one\n\ntwo") == 5
    assert block_boundary("```\na\n\nb\n```\n\nafter") == len("```\na\n\nb\n```\n\n")
    assert block_boundary("```\na\n\nb") == 0
    assert block_boundary("no blank line") == 0


def test_parse_target() -> None:
    target = parse_target("http://example.org:8000", "t0k")
    assert target.url == "ws://example.org:8000/ws/chat?access_token=t0k"
    assert target.shown == "ws://example.org:8000/ws/chat"
    assert parse_target("https://example.org/", "t").url.startswith("wss://example.org/ws/chat")
    assert parse_target("127.0.0.1:9000", "t").port == 9000
    from_url = parse_target("http://127.0.0.1:8000/?token=abc", None)
    assert from_url.url.endswith("/ws/chat?access_token=abc") and "abc" not in from_url.shown
    for bad in ("ftp://x", "ws://", "ws://h:99999"):
        with pytest.raises(UsageError):
            parse_target(bad, "t")


def test_the_input_line() -> None:
    editor = LineEditor()
    assert editor.feed(b"hel") == [] and editor.text == "hel"
    assert editor.feed(b"p\x7flo\x1b[Dworld") == [] and editor.text == "helloworld"
    assert editor.feed("! é\r".encode()) == ["helloworld! é"] and editor.text == ""
    assert editor.feed(b"a b\x17\x15\r") == []
    assert editor.feed(b"\x04") == [None]


def test_a_reply_cut_by_the_token_limit_says_so() -> None:
    out, err = io.StringIO(), io.StringIO()
    conversation = Conversation(PlainView(out, err), chat_id="c")
    conversation.receive({"event": "chat_history", "chat_id": "c", "has_more": False,
                          "last_seq": 9, "messages": [
                              {"seq": 2, "role": "user", "content": "count"},
                              {"seq": 3, "role": "assistant", "response_id": "r0",
                               "content": "one two", "status": "complete",
                               "finish_reason": "length"}]})
    conversation.receive(delta("three", 0, "r1"))
    conversation.receive({"event": "ai_response", "chat_id": "c", "response_id": "r1",
                          "message": "three four", "done": True, "status": "complete",
                          "finish_reason": "length", "seq": 12})
    conversation.receive(delta("fine", 0, "r2"))
    conversation.receive({"event": "ai_response", "chat_id": "c", "response_id": "r2",
                          "message": "fine", "done": True, "status": "complete",
                          "finish_reason": "stop", "seq": 15})
    lines = out.getvalue().splitlines()
    assert lines.count(CUT_NOTE) == 2
    assert lines[-1] == "fine"


def test_a_tool_call_waiting_for_approval_is_shown_and_decided() -> None:
    view = Recorder()
    conversation = Conversation(view, chat_id="c")
    assert conversation.decide(True, "") is None  # nothing waits
    ask = {"event": "tool_approval", "chat_id": "c", "response_id": "r1", "call_id": "k1",
           "tool": "calculator", "arguments": {"expression": "6*7"}}
    conversation.receive(ask)
    conversation.receive(ask)  # asked again after a reconnect: shown once
    notices = [args[0] for name, args in view.calls if name == "notice"]
    assert notices == ['approve calculator({"expression": "6*7"})? /approve or /deny [reason]']
    assert conversation.decide(False, "not now") == {
        "event": "tool_decision", "chat_id": "c", "call_id": "k1", "approve": False,
        "reason": "not now"}
    conversation.receive({"event": "tool_decided", "chat_id": "c", "response_id": "r1",
                          "call_id": "k1", "approve": False, "reason": "not now",
                          "decided_by": "alice"})
    assert [args[0] for name, args in view.calls if name == "notice"][-1] == (
        "denied: not now (by alice)")
    assert conversation.decide(True, "") is None
