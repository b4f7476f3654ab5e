"""``eventchat chat``: a terminal client over the WebSocket contract.

Every line typed is sent as a ``user_message``; the reply streams as it comes. The connection
follows the chat its first message created (or ``--chat-id``, whose history is shown first), so
replies started in other tabs show too.

On a terminal the screen has two parts: what is final is printed and stays, and a live region
at the bottom holds the reply being streamed (raw text), a status line and the input line, so
typing never mixes into the reply. A finished reply is printed again as rendered Markdown.
When standard input or output is not a terminal, lines are read and written plainly (no
escape codes), and the end of input waits for the replies still running.

``/stop`` or Ctrl-C stops the running reply; Ctrl-C when nothing runs, a second Ctrl-C,
``/quit`` or Ctrl-D leaves. A lost connection is made again by itself (with backoff), and the
chat is resumed from the last seq it showed: the replies are rebuilt from their ``offset``s,
with nothing missing and nothing doubled. A connection problem at the start (refused, unknown
host, refused token, wrong path) is one line on stderr and exit code 1; a bad URL or chat id
is exit code 2.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import socket
import ssl
import sys
import termios
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

DEFAULT_URL = "ws://127.0.0.1:8000/ws/chat"
WS_PATH = "/ws/chat"
CONNECT_TIMEOUT_S = 10.0
#: Waits between two connection attempts after a loss: doubled from the first to the last.
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.25, 3.0
#: Without a terminal to leave from, reconnecting stops after this long.
GIVE_UP_S = 60.0
MAX_FRAME_BYTES = 16 * 1024 * 1024
HELP = ("/stop or Ctrl-C: stop the reply · /approve or /deny [reason]: decide on a tool call"
        " · /quit, Ctrl-D or Ctrl-C when idle: leave · /help")


class UsageError(Exception):
    """A URL, token or chat id that cannot be used (exit code 2)."""


@dataclass
class Problem:
    """Why a connection could not be made or ended, in one line; ``fatal`` ones are not
    tried again, ``quiet`` ones need no word to the user (an idle connection closed)."""

    message: str
    fatal: bool = False
    quiet: bool = False

    def __str__(self) -> str:
        return self.message


# -- where to connect -------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    url: str  # ws:// or wss://, with the token in the query
    shown: str  # the same without the token
    host: str
    port: int


def parse_target(url: str, token: str | None) -> Target:
    """The WebSocket URL to use: ``http(s)://`` becomes ``ws(s)://``, a missing scheme is
    ``ws://``, an empty path is ``/ws/chat``; the token may come from the URL (``?token=``,
    as ``eventchat serve`` prints it). Raises ``UsageError``."""
    text = url.strip()
    if "://" not in text:
        text = f"ws://{text}"
    parts = urlsplit(text)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise UsageError(f"{url!r} is not a WebSocket URL: use ws://HOST:PORT{WS_PATH} "
                         f"(wss:// with TLS), for example {DEFAULT_URL}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise UsageError(f"{url!r}: {exc}") from None
    if not host:
        raise UsageError(f"{url!r} names no host: use for example {DEFAULT_URL}")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("token", "access_token")]
    token = token or next((v for k, v in parse_qsl(parts.query)
                           if k in ("token", "access_token")), None)
    if not token:
        raise UsageError("a token is needed: --token T (eventchat users add NAME prints one)")
    path = parts.path if parts.path not in ("", "/") else WS_PATH
    port = port or (443 if scheme == "wss" else 80)
    shown = urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))
    full = urlunsplit((scheme, parts.netloc, path,
                       urlencode([*query, ("access_token", token)]), ""))
    return Target(full, shown, host, port)


def parse_chat_id(chat_id: str | None) -> str | None:
    if chat_id is None:
        return None
    try:
        return str(uuid.UUID(chat_id))
    except ValueError:
        raise UsageError(f"--chat-id {chat_id!r} is not a chat id (a UUID)") from None


# -- the connection ---------------------------------------------------------------------------

def problem_of(exc: BaseException, target: Target) -> Problem:
    """One line for what went wrong while connecting; 401, 403 and 404 are fatal."""
    where = f"{target.host}:{target.port}"
    if isinstance(exc, ConnectionRejected):
        status = exc.status_code
        if status == 401:
            return Problem("the server refused the token (401)", fatal=True)
        if status == 404:
            return Problem(f"{target.shown} is not the chat WebSocket (404): its "
                                     f"path is {WS_PATH}", fatal=True)
        detail = _error_message(exc.body)
        return Problem(f"the server refused the connection ({status}"
                                 f"{': ' + detail if detail else ''})", fatal=status == 403)
    if isinstance(exc, ConnectionTimeout):
        hint = " (is it a TLS server? ws:// is plain, wss:// TLS)" if target.url.startswith(
            "wss") else ""
        return Problem(f"no answer from {where} within {CONNECT_TIMEOUT_S:g} s{hint}")
    cause = _root_cause(exc)
    if isinstance(cause, socket.gaierror):
        return Problem(f"cannot find host {target.host!r} ({cause.strerror})")
    if isinstance(cause, ConnectionRefusedError):
        return Problem(f"cannot connect to {where}: connection refused "
                                 "(is eventchat serve running there?)")
    if isinstance(cause, ssl.SSLError):
        return Problem(f"the TLS handshake with {where} failed ({cause.reason}); "
                                 "ws:// is plain, wss:// TLS")
    if isinstance(cause, OSError):
        return Problem(f"cannot connect to {where}: {cause.strerror or cause}")
    if isinstance(cause, ConnectionClosed):
        return Problem(f"{where} closed the connection during the handshake")
    return Problem(f"the WebSocket handshake with {where} failed "
                             f"({type(cause).__name__})")


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause, through ``__cause__`` chains and exception groups."""
    for _ in range(20):  # a chain has a few links; a loop in one must not hang
        if isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        elif isinstance(exc, HandshakeError) and exc.__context__ is not None:
            exc = exc.__context__
        else:
            break
    return exc


def _error_message(body: bytes | None) -> str:
    try:
        return str(json.loads(body or b"")["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


def closed_reason(exc: ConnectionClosed) -> str:
    reason = exc.reason
    code = getattr(reason, "code", None)
    text = getattr(reason, "reason", None) or ""
    if code == 1001 and "shutting down" in text:
        return "the server is shutting down"
    if code in (None, 1005, 1006):
        return "the connection to the server was lost"
    return f"the server closed the connection ({code}{': ' + text if text else ''})"


# -- what the chat holds ----------------------------------------------------------------------

@dataclass
class Reply:
    """One assistant reply as this client has it: text rebuilt from offsets, tool lines."""

    response_id: str
    text: str = ""
    #: (offset in ``text`` at which it happened, line)
    tools: list[tuple[int, str]] = field(default_factory=list)
    status: str = "streaming"
    #: How a complete reply ended (``length``: cut by the token limit).
    finish_reason: str | None = None


class View(Protocol):
    status: str

    def banner(self, target: Target, chat_id: str | None) -> None: ...
    def chat_started(self, chat_id: str) -> None: ...
    def user_message(self, text: str, note: str = "") -> None: ...
    def reply_text(self, reply: Reply, added: str) -> None: ...
    def tool_line(self, reply: Reply, line: str) -> None: ...
    def reply_done(self, reply: Reply) -> None: ...
    def past_reply(self, reply: Reply) -> None: ...
    def stats(self, text: str) -> None: ...
    def notice(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...
    def set_status(self, text: str) -> None: ...
    def set_activity(self, text: str) -> None: ...


class Conversation:
    """The chat as this client has shown it; turns frames into what the view shows.

    Synchronous and free of I/O. It keeps what a reconnect needs: the messages not yet
    acknowledged (sent again with their ``client_message_id``, which the server accepts
    once), the seq to resume after, and the text of each running reply (merged by offset).
    With ``one_at_a_time`` a message goes only once the previous one is answered (input
    that is not typed: a script's lines make a conversation, not a queue).
    """

    def __init__(self, view: View, chat_id: str | None = None,
                 one_at_a_time: bool = False) -> None:
        self.view = view
        self.chat_id = chat_id
        self.one_at_a_time = one_at_a_time
        self.last_seq = 0
        #: the last seq before which every turn had ended when it was seen
        self.settled_seq = 0
        self.pending: dict[str, dict[str, Any]] = {}  # client_message_id -> frame, unacked
        self.sent: set[str] = set()  # pending messages sent on this connection
        self.unanswered: set[int] = set()  # seqs of our acknowledged messages
        self.replies: dict[str, Reply] = {}  # running replies
        self.finished: set[str] = set()  # response ids shown to their end
        self.shown: set[int] = set()  # user message seqs shown
        self.calls: set[str] = set()  # tool call ids shown
        self.asking: dict[str, dict[str, Any]] = {}  # call id -> tool_approval, undecided
        self.stopping = False
        self.joined = chat_id is None  # the first chat_history of --chat-id not seen yet
        self.fatal: str | None = None

    @property
    def busy(self) -> bool:
        """A message waits for its answer, or a reply is running."""
        return bool(self.pending or self.unanswered or self.replies)

    @property
    def settled(self) -> bool:
        """Nothing runs, and the history of ``--chat-id`` has been shown."""
        return self.joined and not self.busy

    # -- out --------------------------------------------------------------------------------

    def message(self, text: str) -> None:
        """Takes a message to send; ``ready()`` says when it goes."""
        client_message_id = uuid.uuid4().hex
        self.pending[client_message_id] = {"event": "user_message", "message": text,
                                           "client_message_id": client_message_id}

    def ready(self) -> list[dict[str, Any]]:
        """The messages to send now, in order: while the chat is not known, only the first
        (its ``ack`` names the chat for the others)."""
        frames = []
        for client_message_id, frame in self.pending.items():
            if client_message_id in self.sent:
                continue
            if self.chat_id is None and self.sent:
                break
            if self.one_at_a_time and (self.sent or self.unanswered or self.replies):
                break
            self.sent.add(client_message_id)
            frames.append(self._addressed(frame))
        return frames

    def stop(self) -> dict[str, Any] | None:
        self.stopping = True
        return {"event": "stop", "chat_id": self.chat_id} if self.chat_id else None

    def on_connect(self) -> list[dict[str, Any]]:
        """The frames that resume the chat on a new connection: ``subscribe`` (after the last
        seq when every turn seen had ended, else after the last settled one), then the
        messages not acknowledged yet."""
        frames: list[dict[str, Any]] = []
        self.sent.clear()
        if self.chat_id:
            after = self.settled_seq if self.busy else self.last_seq
            subscribe: dict[str, Any] = {"event": "subscribe", "chat_id": self.chat_id}
            if self.joined:
                subscribe["after_seq"] = after
            frames.append(subscribe)
        frames += self.ready()
        if self.stopping and self.chat_id:  # asked for while disconnected
            frames.append({"event": "stop", "chat_id": self.chat_id})
        return frames

    def _addressed(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {**frame, "chat_id": self.chat_id} if self.chat_id else frame

    # -- in ---------------------------------------------------------------------------------

    def receive(self, frame: dict[str, Any]) -> None:
        if self.chat_id is not None and frame.get("chat_id") not in (None, self.chat_id):
            return
        handler = getattr(self, f"_on_{frame.get('event')}", None)
        if handler is not None:
            handler(frame)
        if not self.busy:
            self.settled_seq = self.last_seq
            self.stopping = False

    def _seen(self, seq: Any) -> None:
        if isinstance(seq, int):
            self.last_seq = max(self.last_seq, seq)

    def _on_ack(self, frame: dict[str, Any]) -> None:
        if self.chat_id is None:
            self.chat_id = frame["chat_id"]
            self.joined = True
            self.view.chat_started(frame["chat_id"])
        if self.pending.pop(frame.get("client_message_id") or "", None) is not None:
            self.sent.discard(frame.get("client_message_id") or "")
            self.unanswered.add(frame["seq"])
        self.shown.add(frame["seq"])
        self._seen(frame["seq"])

    def _on_ai_response(self, frame: dict[str, Any]) -> None:
        response_id = frame["response_id"]
        if response_id in self.finished:
            return
        reply = self.replies.setdefault(response_id, Reply(response_id))
        if frame.get("done"):
            reply.finish_reason = frame.get("finish_reason")
            self._add(reply, frame.get("message") or "", 0)
            self._seen(frame.get("seq"))
            self._finish(reply, frame.get("status") or "complete", live=True)
        else:
            self._add(reply, frame.get("delta") or "", int(frame.get("offset") or 0))

    def _add(self, reply: Reply, text: str, offset: int) -> None:
        """Adds what ``text`` at ``offset`` holds beyond what the reply has."""
        have = len(reply.text)
        if offset > have:  # a gap (never sent so): keep what comes, in order
            offset = have
        added = text[have - offset:]
        if added:
            reply.text += added
            self.view.reply_text(reply, added)

    def _finish(self, reply: Reply, status: str, live: bool) -> None:
        reply.status = status
        self.replies.pop(reply.response_id, None)
        self.finished.add(reply.response_id)
        if live:
            self.view.reply_done(reply)
        else:
            self.view.past_reply(reply)

    def _on_tool_activity(self, frame: dict[str, Any]) -> None:
        if frame.get("status") == "started" or frame.get("call_id") in self.calls:
            return
        self.calls.add(frame.get("call_id") or "")
        reply = self.replies.setdefault(frame["response_id"], Reply(frame["response_id"]))
        line = tool_line(frame.get("tool"), frame.get("status") == "completed",
                         frame.get("result"), frame.get("error"))
        reply.tools.append((len(reply.text), line))
        self.view.tool_line(reply, line)

    def _on_tool_approval(self, frame: dict[str, Any]) -> None:
        call_id = frame.get("call_id") or ""
        if call_id in self.asking:  # asked again on a new connection
            return
        self.asking[call_id] = frame
        arguments = json.dumps(frame.get("arguments"), ensure_ascii=False)
        self.view.notice(f"approve {frame.get('tool')}({arguments})? "
                         "/approve or /deny [reason]")

    def _on_tool_decided(self, frame: dict[str, Any]) -> None:
        if self.asking.pop(frame.get("call_id") or "", None) is None:
            return
        reason = f": {frame['reason']}" if frame.get("reason") else ""
        verdict = "approved" if frame.get("approve") else f"denied{reason}"
        self.view.notice(f"{verdict} (by {frame.get('decided_by')})")

    def decide(self, approve: bool, reason: str) -> dict[str, Any] | None:
        """The ``tool_decision`` frame for the oldest call waiting (None: none waits)."""
        if not self.asking or self.chat_id is None:
            return None
        call_id = next(iter(self.asking))
        frame: dict[str, Any] = {"event": "tool_decision", "chat_id": self.chat_id,
                                 "call_id": call_id, "approve": approve}
        if reason:
            frame["reason"] = reason
        return frame

    def _on_backend_status(self, frame: dict[str, Any]) -> None:
        self.view.stats(stats_line(frame))

    def _on_chat_history(self, frame: dict[str, Any]) -> None:
        first = not self.joined
        self.joined = True
        messages = frame.get("messages") or []
        if first and frame.get("has_more"):
            self.view.notice("(earlier messages are not shown)")
        for message in messages:
            if message.get("role") == "user":
                self._history_user(message, first)
            else:
                self._history_reply(message)
        self._answered(messages)
        self._seen(frame.get("last_seq"))

    def _history_user(self, message: dict[str, Any], first: bool) -> None:
        if message["seq"] in self.shown:
            return
        self.shown.add(message["seq"])
        self.view.user_message(message.get("content") or "",
                               "" if first else "(sent from another client)")

    def _history_reply(self, message: dict[str, Any]) -> None:
        response_id = message.get("response_id") or ""
        if response_id in self.finished:
            return
        if message.get("status") == "streaming":  # its text follows, from offset 0
            self.replies.setdefault(response_id, Reply(response_id))
            return
        reply = self.replies.get(response_id)
        if reply is None:
            reply = Reply(response_id, tools=[
                (0, tool_line(c.get("tool"), c.get("error") is None, c.get("result"),
                              c.get("error"))) for c in message.get("tool_calls") or []])
            reply.text = message.get("content") or ""
            reply.finish_reason = message.get("finish_reason")
            self._finish(reply, message.get("status") or "complete", live=False)
            return
        reply.finish_reason = message.get("finish_reason")
        self._add(reply, message.get("content") or "", 0)
        self._finish(reply, message.get("status") or "complete", live=True)

    def _answered(self, messages: list[dict[str, Any]]) -> None:
        """Forgets our messages that an ended reply in ``messages`` answers (the nearest
        earlier user message: a chat answers its messages in order)."""
        users = {m["seq"] for m in messages if m.get("role") == "user"}
        for message in messages:
            if message.get("role") == "user" or message.get("status") == "streaming":
                continue
            earlier = [s for s in users | self.unanswered if s < message["seq"]]
            if earlier:
                answered = message.get("parent_seq") or max(earlier)
                self.unanswered.discard(answered)
                users.discard(answered)

    def _on_error(self, frame: dict[str, Any]) -> None:
        code, text = frame.get("code"), frame.get("message") or ""
        if self.pending.pop(frame.get("client_message_id") or "", None) is not None:
            self.sent.discard(frame.get("client_message_id") or "")
            self.view.error(f"message not sent: {text} ({code})")
        elif code == "no_response_in_progress" and self.stopping:
            self.view.notice("nothing to stop")
        elif code == "chat_not_found" and not self.joined:
            self.fatal = f"no chat {self.chat_id} (or it belongs to another user)"
        elif not frame.get("response_id"):  # a failed reply already says so at its end
            self.view.error(f"{text} ({code})")
        else:
            self.view.error(text)


def tool_line(tool: Any, ok: bool, result: Any, error: Any) -> str:
    shown = result if ok else f"failed: {error}"
    if not isinstance(shown, str):
        shown = json.dumps(shown, ensure_ascii=False)
    return f"[{tool}: {shown}]"


def stats_line(frame: dict[str, Any]) -> str:
    parts = [str(frame.get("model") or "model"), f"{frame.get('tokens_used', 0)} tokens"]
    if frame.get("ttft_ms") is not None:
        parts.append(f"first token {frame['ttft_ms']:.0f} ms")
    if frame.get("tokens_per_second"):
        parts.append(f"{frame['tokens_per_second']:.0f} tokens/s")
    return " · ".join(parts)


STATUS_NOTES = {"stopped": "[stopped]", "interrupted": "[interrupted]", "failed": "[failed]"}
CUT_NOTE = "[cut: the reply reached its token limit]"


def status_note(reply: Reply) -> str | None:
    """What the end of a reply says, if anything: how it ended early, or that the model's
    token limit cut it."""
    if reply.status == "complete" and reply.finish_reason == "length":
        return CUT_NOTE
    return STATUS_NOTES.get(reply.status)


# -- plain output (not a terminal) ------------------------------------------------------------

class PlainView:
    """Writes the conversation to stdout as plain text (user lines as ``> text``), and
    notices, errors and figures to stderr."""

    def __init__(self, out: Any = None, err: Any = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.line_open = False
        self.status = ""

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        if text:
            self.line_open = not text.endswith("\n")

    def _line(self, text: str) -> None:
        self._write(("\n" if self.line_open else "") + text + "\n")

    def _note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def banner(self, target: Target, chat_id: str | None) -> None:
        self._note(f"eventchat: connected to {target.shown}"
                   + (f"; chat {chat_id}" if chat_id else ""))

    def chat_started(self, chat_id: str) -> None:
        self._note(f"eventchat: chat {chat_id}")

    def user_message(self, text: str, note: str = "") -> None:
        self._line(f"> {text}" + (f"  {note}" if note else ""))

    def reply_text(self, reply: Reply, added: str) -> None:
        self._write(added)

    def tool_line(self, reply: Reply, line: str) -> None:
        self._line(line)

    def reply_done(self, reply: Reply) -> None:
        note = status_note(reply)
        if note:
            self._line(note)
        elif self.line_open:
            self._write("\n")

    def past_reply(self, reply: Reply) -> None:
        for _, line in reply.tools:
            self._line(line)
        if reply.text:
            self._line(reply.text)
        self.reply_done(reply)

    def stats(self, text: str) -> None:
        self._note(f"[{text}]")

    def notice(self, text: str) -> None:
        self._note(f"[{text}]")

    def error(self, text: str) -> None:
        self._note(f"[error: {text}]")

    def set_status(self, text: str) -> None:
        if text and text != self.status:
            self._note(f"[{text}]")
        self.status = text

    def set_activity(self, text: str) -> None:
        pass  # the reply itself shows it


# -- the interactive screen -------------------------------------------------------------------

class LineEditor:
    """The input line: takes the bytes of keys (terminal in cbreak mode), returns the lines
    entered. Knows printable text, Backspace, Ctrl-U, Ctrl-W and Enter; Ctrl-D on an empty
    line is the end of input (``None``); escape sequences (arrows, ...) are skipped."""

    def __init__(self) -> None:
        self.text = ""
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._escape = ""

    def feed(self, data: bytes) -> list[str | None]:
        entered: list[str | None] = []
        for char in self._decode(data):
            if self._escape:
                self._escape += char
                if self._escape_done():
                    self._escape = ""
            elif char == "\x1b":
                self._escape = char
            elif char in "\r\n":
                if self.text.strip():
                    entered.append(self.text)
                self.text = ""
            elif char in "\x7f\x08":
                self.text = self.text[:-1]
            elif char == "\x15":
                self.text = ""
            elif char == "\x17":
                self.text = self.text.rstrip()
                self.text = self.text[: self.text.rfind(" ") + 1]
            elif char == "\x04":
                if not self.text:
                    entered.append(None)
            elif char == "\t" or char >= " ":
                self.text += char
        return entered

    def _escape_done(self) -> bool:
        body = self._escape[1:]
        if body[:1] in ("[", "O"):
            return len(body) > 1 and (body[0] == "O" or "@" <= body[-1] <= "~")
        return True


class TerminalView:
    """The interactive screen (``rich``): final output is printed above a live region that
    holds the reply being streamed (raw), messages waiting their turn, a status line and the
    input line. A finished reply is printed again as rendered Markdown, unless it outgrew the
    screen while streaming: then its finished paragraphs were printed rendered as it went,
    or, for a single block taller than the screen, its lines raw."""

    def __init__(self, console: Console, editor: LineEditor) -> None:
        self.console = console
        self.editor = editor
        self.live = Live(self, console=console, auto_refresh=False, transient=True,
                         redirect_stdout=False, redirect_stderr=False,
                         vertical_overflow="visible")
        self.reply: Reply | None = None
        self.printed = 0  # characters of ``reply`` printed above
        self.raw = False  # ``reply`` is printed raw to its end
        self.queued: list[str] = []
        self.status = ""  # the connection's
        self.activity = ""  # what runs
        self.changed = trio.Event()

    # -- the live region --------------------------------------------------------------------

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        if self.reply is not None:
            yield from self._reply_parts(self.reply, self.printed, None, markdown=False)
        for line in self.queued[-3:]:
            yield Text(f"> {line}", style="dim")
        if len(self.queued) > 3:
            yield Text(f"  (+{len(self.queued) - 3} more waiting)", style="dim")
        if self.status or self.activity:
            yield Text(self.status or self.activity, style="dim italic")
        shown = self.editor.text[-(3 * max(20, options.max_width)):]
        yield Text.assemble(("> ", "bold cyan"), shown, (" ", "reverse"))

    def _reply_parts(self, reply: Reply, start: int, end: int | None,
                     markdown: bool) -> list[Any]:
        """``reply.text[start:end]`` with its tool lines, as Markdown or raw text."""
        end = len(reply.text) if end is None else end
        parts: list[Any] = []
        at = start
        for offset, line in reply.tools:
            if start <= offset < end or (offset == end == len(reply.text) and offset >= start):
                if reply.text[at:offset].strip():
                    parts.append(Markdown(reply.text[at:offset]) if markdown
                                 else Text(reply.text[at:offset]))
                parts.append(Text(line, style="magenta"))
                at = offset
        if reply.text[at:end].strip() or (not markdown and reply.text[at:end]):
            parts.append(Markdown(reply.text[at:end]) if markdown else Text(reply.text[at:end]))
        return parts

    def touch(self) -> None:
        self.changed.set()

    async def refresh_loop(self) -> None:
        """Redraws the live region when it changed, at most 30 times a second."""
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            self.live.refresh()
            await trio.sleep(1 / 30)

    def _print(self, *renderables: Any) -> None:
        self.console.print(*renderables)

    # -- what the conversation shows --------------------------------------------------------

    def banner(self, target: Target, chat_id: str | None) -> None:
        """Says where we are and how to leave, and shows the live region (from now on)."""
        self._print(Text.assemble(("eventchat chat", "bold"), f" · {target.shown}"))
        if chat_id:
            self._print(Text(f"chat {chat_id}", style="bold"))
        else:
            self._print(Text("a new chat: your first message starts it", style="dim"))
        self._print(Text(HELP, style="dim"))
        self.live.start(refresh=True)

    def chat_started(self, chat_id: str) -> None:
        self._print(Text(f"chat {chat_id}", style="dim"))

    def user_message(self, text: str, note: str = "") -> None:
        line = Text.assemble(("> ", "bold cyan"), (text, "bold"), (f"  {note}" if note else "",
                                                                   "dim"))
        if self.reply is not None:
            self.queued.append(text)  # shown once the running reply is printed
            self.touch()
        else:
            self._print(line)

    def reply_text(self, reply: Reply, added: str) -> None:
        if self.reply is not reply:
            self._end_current()
            self.reply, self.printed, self.raw = reply, 0, False
        self._fit()
        self.touch()

    def tool_line(self, reply: Reply, line: str) -> None:
        self.reply_text(reply, "")

    def reply_done(self, reply: Reply) -> None:
        if self.reply is not reply:
            self._end_current()
            self.reply, self.printed, self.raw = reply, 0, False
        self._print(*self._reply_parts(reply, self.printed, None, markdown=not self.raw),
                    *self._status_note(reply))
        self.reply = None
        self._flush_queued()
        self.touch()

    def past_reply(self, reply: Reply) -> None:
        self._print(*self._reply_parts(reply, 0, None, markdown=True), *self._status_note(reply))

    def _status_note(self, reply: Reply) -> list[Any]:
        note = status_note(reply)
        style = "red" if reply.status == "failed" else "yellow"
        return [Text(note, style=style)] if note else []

    def _end_current(self) -> None:
        """Another reply starts while one is shown (another client's turn): prints it."""
        if self.reply is not None:
            self._print(*self._reply_parts(self.reply, self.printed, None, markdown=False))
            self.reply = None

    def _flush_queued(self) -> None:
        for text in self.queued:
            self._print(Text.assemble(("> ", "bold cyan"), (text, "bold")))
        self.queued.clear()

    def _fit(self) -> None:
        """Keeps the live region within the screen: prints the finished paragraphs of a
        reply that outgrew it (rendered), or, for one block, its first lines (raw)."""
        reply = self.reply
        assert reply is not None
        room = max(3, self.console.height - 4 - min(4, len(self.queued)))
        while self._rows(reply) > room:
            tail = reply.text[self.printed:]
            cut = 0 if self.raw else block_boundary(tail)
            if not cut:
                self.raw = True
                cut = raw_boundary(tail, len(tail) - 2 * self.console.width)
            end = self.printed + cut
            self._print(*self._reply_parts(reply, self.printed, end, markdown=not self.raw))
            self.printed = end

    def _rows(self, reply: Reply) -> int:
        group = Group(*self._reply_parts(reply, self.printed, None, markdown=False))
        return len(self.console.render_lines(group, self.console.options, pad=False))

    def stats(self, text: str) -> None:
        self._print(Text(text, style="dim"))

    def notice(self, text: str) -> None:
        self._print(Text(text, style="dim"))

    def error(self, text: str) -> None:
        self._print(Text(f"error: {text}", style="red"))

    def set_status(self, text: str) -> None:
        self.status = text
        self.touch()

    def set_activity(self, text: str) -> None:
        if text != self.activity:
            self.activity = text
            self.touch()


def block_boundary(text: str) -> int:
    """Where the last finished Markdown block of ``text`` ends (after a blank line that is
    not inside a fenced code block), leaving the block in progress; 0 if none."""
    fence = ""
    boundary = position = 0
    end = len(text.rstrip())
    lines = text.split("\n")
    for index, line in enumerate(lines[:-1]):
        position += len(line) + 1
        marker = line.lstrip()[:3]
        if marker in ("```", "~~~"):
            fence = "" if fence == marker else (fence or marker)
        elif (not fence and not line.strip() and index > 0 and lines[index - 1].strip()
              and position < end):
            boundary = position
    return boundary


def raw_boundary(text: str, limit: int) -> int:
    """Where to cut ``text`` at ``limit`` or before: after a line's end, else after a space,
    else anywhere (one unbroken word)."""
    limit = max(1, limit)
    return text.rfind("\n", 0, limit) + 1 or text.rfind(" ", 0, limit) + 1 or limit


@contextmanager
def cbreak(fd: int) -> Iterator[Callable[[], None]]:
    """Keys come one by one and are not echoed (Ctrl-C still signals); restored on exit.
    Yields the function that sets the mode again (after a suspend and resume)."""
    old = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[3] &= ~(termios.ICANON | termios.ECHO)
    mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0

    def apply() -> None:
        termios.tcsetattr(fd, termios.TCSANOW, mode)

    apply()
    try:
        yield apply
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


# -- the client -------------------------------------------------------------------------------

class ChatClient:
    """Runs the conversation: input, signals and the connection, made again when lost.

    ``run(read_input)`` starts ``read_input`` once the first connection is made and returns
    the exit code: 0 when the user leaves, 1 after a connection problem (``failure`` says
    which, in one line). Cancelling it closes the connection.
    """

    def __init__(self, target: Target, view: View, chat_id: str | None,
                 interactive: bool) -> None:
        self.target = target
        self.view = view
        self.conversation = Conversation(view, chat_id, one_at_a_time=not interactive)
        self.interactive = interactive
        self.shown: set[str] = set()  # messages shown as sent
        self.banner_due = False
        self.outbox_send, self.outbox = trio.open_memory_channel[dict[str, Any]](256)
        self.connected = False
        self.sessions = 0
        self.done = trio.Event()
        self.failure: str | None = None
        self.end_of_input = False
        self.resume_tty: Callable[[], None] = lambda: None

    def leave(self, failure: str | None = None) -> None:
        if failure and self.failure is None:
            self.failure = failure
        self.done.set()

    async def run(self, read_input: Callable[[], Awaitable[None]]) -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            nursery.start_soon(self._connections, nursery, read_input)
            await self.done.wait()
            nursery.cancel_scope.cancel()
        return 1 if self.failure else 0

    # -- the user's side --------------------------------------------------------------------

    def enter(self, text: str) -> None:
        """A line the user entered: a command, or a message."""
        command = text.strip()
        if command in ("/quit", "/exit"):
            self.leave()
        elif command == "/stop":
            self.stop()
        elif command == "/help":
            self.view.notice(HELP)
        elif command.split(" ", 1)[0] in ("/approve", "/deny"):
            verb, _, reason = command.partition(" ")
            frame = self.conversation.decide(verb == "/approve", reason.strip())
            if frame is None:
                self.view.notice("no tool call waits for a decision")
            else:
                self._send(frame)
        else:
            self.conversation.message(text)
            if self.interactive:  # shown as typed; else as sent, in turn
                self.view.user_message(text, "" if self.connected else "(sent once connected)")
            self._send_ready()
            self.show_activity()

    def stop(self) -> None:
        if not self.conversation.busy:
            self.view.notice("nothing to stop")
            return
        frame = self.conversation.stop()
        if frame is not None:
            self._send(frame)
        self.show_activity()

    def show_activity(self) -> None:
        conversation = self.conversation
        if conversation.stopping and conversation.busy:
            self.view.set_activity("stopping… (Ctrl-C again leaves)")
        elif conversation.busy:
            self.view.set_activity("answering… (Ctrl-C or /stop stops it)")
        else:
            self.view.set_activity("")

    def interrupt(self) -> None:
        """Ctrl-C: stops the running reply; leaves when nothing runs or already stopping."""
        if self.conversation.busy and not self.conversation.stopping:
            self.stop()
        else:
            self.leave()

    def end_input(self) -> None:
        """No more input: leave now on a terminal (Ctrl-D), else once the replies ended."""
        self.end_of_input = True
        if self.interactive or self.conversation.settled:
            self.leave()

    def _send_ready(self) -> None:
        if self.connected:  # else they wait in the conversation, and go once connected
            for frame in self.conversation.ready():
                self._send(frame)

    def _send(self, frame: dict[str, Any]) -> None:
        if not self.connected:
            return
        if frame["event"] == "user_message" and frame["client_message_id"] not in self.shown:
            self.shown.add(frame["client_message_id"])
            if not self.interactive:
                self.view.user_message(frame["message"])
        try:
            self.outbox_send.send_nowait(frame)
        except trio.WouldBlock:
            self.view.error("too many messages waiting to be sent")

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGCONT) as signals:
            async for signum in signals:
                if signum == signal.SIGCONT:  # back from Ctrl-Z: the shell reset the tty
                    self.resume_tty()
                    self.view.set_status(self.view.status)
                else:
                    self.interrupt()

    # -- the connection ---------------------------------------------------------------------

    async def _connections(self, nursery: trio.Nursery,
                           read_input: Callable[[], Awaitable[None]]) -> None:
        """Connects, and connects again after a loss (backoff doubling up to
        ``BACKOFF_MAX_S``) until the user leaves; a problem before the first connection,
        or a fatal one, ends the client."""
        attempt, lost_at = 0, 0.0
        while True:
            sessions = self.sessions
            problem = await self._connection(nursery, read_input)
            if problem.fatal or not self.sessions:
                self.leave(str(problem))
                return
            if self.sessions != sessions:
                attempt, lost_at = 0, trio.current_time()
                if problem.quiet:
                    continue  # the server closed an idle connection: nothing was lost
                self.view.notice(f"{problem}: connecting again…")
            elif not self.interactive and trio.current_time() - lost_at > GIVE_UP_S:
                self.leave(f"{problem}; gave up after {GIVE_UP_S:g} s")
                return
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**attempt)
            self.view.set_status(f"{problem}; connecting again in {delay:g} s (Ctrl-C leaves)")
            attempt += 1
            await trio.sleep(delay)

    async def _connection(self, nursery: trio.Nursery,
                          read_input: Callable[[], Awaitable[None]]) -> Problem:
        """One connection, from opening to loss; returns what ended it."""
        ended: Problem | None = None
        try:
            async with open_websocket_url(
                self.target.url, connect_timeout=CONNECT_TIMEOUT_S, disconnect_timeout=1,
                message_queue_size=256, max_message_size=MAX_FRAME_BYTES,
            ) as ws:
                ended = await self._session(ws, nursery, read_input)
        except (HandshakeError, ConnectionClosed, OSError) as exc:
            if ended is None:  # else: the close after the loss failed too
                ended = problem_of(exc, self.target)
        finally:
            self.connected = False
        return ended

    async def _session(self, ws: WebSocketConnection, nursery: trio.Nursery,
                       read_input: Callable[[], Awaitable[None]]) -> Problem:
        while True:  # what was queued for the lost connection goes again from on_connect
            try:
                self.outbox.receive_nowait()
            except trio.WouldBlock:
                break
        self.connected = True
        for frame in self.conversation.on_connect():
            self._send(frame)
        self.sessions += 1
        if self.sessions == 1:
            if self.conversation.chat_id is None:
                self.view.banner(self.target, None)
            else:  # before the history, unless the chat is not there
                self.banner_due = True
            nursery.start_soon(read_input)
        else:
            self.view.set_status("")
            self.view.notice("connected again")
        async with trio.open_nursery() as inner:
            inner.start_soon(self._writer, ws)
            problem = await self._reader(ws)
            inner.cancel_scope.cancel()
        return problem

    async def _writer(self, ws: WebSocketConnection) -> None:
        async for frame in self.outbox:
            try:
                await ws.send_message(json.dumps(frame))
            except ConnectionClosed:
                return  # the reader sees it too

    async def _reader(self, ws: WebSocketConnection) -> Problem:
        conversation = self.conversation
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed as exc:
                problem = Problem(closed_reason(exc))
                problem.quiet = (getattr(exc.reason, "reason", "") == "idle timeout"
                                 and not conversation.busy)
                return problem
            try:
                frame = json.loads(raw)
            except ValueError:
                continue
            if isinstance(frame, dict):
                if self.banner_due and frame.get("code") != "chat_not_found":
                    self.banner_due = False
                    self.view.banner(self.target, conversation.chat_id)
                conversation.receive(frame)
                self._send_ready()
                self.show_activity()
            if conversation.fatal:
                return Problem(conversation.fatal, fatal=True)
            if self.end_of_input and conversation.settled:
                self.leave()


# -- entry point ------------------------------------------------------------------------------

async def run_terminal_chat(url: str, token: str | None, chat_id: str | None = None) -> int:
    """Runs the client until the user leaves; returns the exit code (0: left, 1: a
    connection problem, 2: a bad URL or chat id), after one line on stderr for 1 and 2."""
    try:
        target = parse_target(url, token)
        chat = parse_chat_id(chat_id)
    except UsageError as exc:
        print(f"eventchat chat: {exc}", file=sys.stderr)
        return 2
    console = Console(highlight=False)
    # a terminal that can draw the live region (not TERM=dumb), for typed input
    if sys.stdin.isatty() and console.is_interactive:
        code, failure = await _interactive(target, chat, console)
    else:
        client = ChatClient(target, PlainView(), chat, interactive=False)
        code, failure = await client.run(read_lines(client)), client.failure
    if failure:
        print(f"eventchat chat: {failure}", file=sys.stderr)
    return code


def read_lines(client: ChatClient) -> Callable[[], Awaitable[None]]:
    """Standard input as lines (not a terminal), in a worker thread left behind on exit."""
    async def read() -> None:
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                client.end_input()
                return
            if line.strip():
                client.enter(line.rstrip("\n"))
    return read


async def _interactive(target: Target, chat_id: str | None,
                       console: Console) -> tuple[int, str | None]:
    editor = LineEditor()
    view = TerminalView(console, editor)
    client = ChatClient(target, view, chat_id, interactive=True)
    fd = sys.stdin.fileno()

    async def read_keys() -> None:
        while True:
            data = await trio.to_thread.run_sync(os.read, fd, 1024, abandon_on_cancel=True)
            if not data:
                client.end_input()
                return
            for line in editor.feed(data):
                if line is None:
                    client.end_input()
                else:
                    client.enter(line)
            view.touch()

    with cbreak(fd) as resume:
        client.resume_tty = resume
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(view.refresh_loop)
                code = await client.run(read_keys)
                nursery.cancel_scope.cancel()
        finally:
            view.live.stop()
    return code, client.failure
