"""The chat session aggregate: every fact of a chat, as immutable events.

A chat's events are numbered 1, 2, 3, ... by the aggregate version; that number is the
``seq`` of the wire contract. Public methods are imperative (``receive_message``) and check
the chat's invariants *before* triggering an event, so a refused command records nothing.
The module is synchronous and does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, NotRequired, TypedDict
from uuid import UUID, uuid4

from eventsourcing.domain import Aggregate

from .errors import (
    AlreadyDecidedError,
    ChatDeletedError,
    ChatRuleError,
    DuplicateMessageError,
    EmptyMessageError,
    EmptyTitleError,
    MessageNotFoundError,
    MessageTooLongError,
    NoMessageWaitingError,
    NoResponseInProgressError,
    ResponseInProgressError,
    ToolCallNotFoundError,
)
from .text import check_text, clean_json, clean_text
from .tree import LINE, Node, Tree

#: The title of a chat created without one, until its first message titles it.
DEFAULT_TITLE = "New chat"
#: Longest title taken from a first message (code points).
AUTO_TITLE_CHARS = 80


def auto_title(text: str) -> str:
    """A title from a message: its first non-blank line, at most ``AUTO_TITLE_CHARS`` code
    points (cut at a word boundary when one is near, with an ellipsis)."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), DEFAULT_TITLE)
    line = " ".join(line.split())
    if len(line) <= AUTO_TITLE_CHARS:
        return line
    cut = line[: AUTO_TITLE_CHARS - 1]
    space = cut.rfind(" ")
    if space >= AUTO_TITLE_CHARS // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


class ResponseUsage(TypedDict):
    """Tokens a response used, summed over its model rounds (stored as this dict)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: Present (True) when the server reported no usage and these are estimates.
    estimated: NotRequired[bool]
    #: The server's own timings, when it sends them (llama.cpp ``timings``, Ollama's).
    server_timings: NotRequired[dict[str, object]]


class ResponseTiming(TypedDict):
    """How long a response took (stored as this dict)."""

    #: Time to the first token; None when the model sent no text.
    ttft_ms: float | None
    duration_ms: float
    tokens_per_second: float


#: What the ending methods accept as ``usage`` and ``timing``: a ``ResponseUsage`` and a
#: ``ResponseTiming`` from the actor (any JSON object is stored as given).
Measured = Mapping[str, object]


class HistoryEntry(TypedDict):
    """One turn of the conversation as the model sees it."""

    role: str
    content: str
    seq: int
    #: The model a user message asked to be answered by (its turn's, not the chat's).
    model: NotRequired[str]


class MessageNode(TypedDict):
    """One message of the chat's tree, as the aggregate keeps it (every branch)."""

    seq: int
    role: str
    #: As recorded (``tree.Tree`` places a user message queued behind another).
    parent: int | None
    #: A reply's text once it has ended ("" before).
    content: str
    model: NotRequired[str]


@dataclass
class ToolCallState:
    call_id: str
    tool: str
    arguments: object
    result: object = None
    error: str | None = None
    duration_ms: float | None = None
    done: bool = False
    #: A person's approval: None (not needed), ``waiting``, ``approved`` or ``denied``.
    approval: str | None = None
    #: When the approval was asked for (its timeout counts from then, across restarts).
    requested_at: datetime | None = None
    #: Why it was denied (``timeout`` when no one decided in time).
    reason: str | None = None


@dataclass
class ActiveResponse:
    """The response being generated: its text so far as persisted, and its tool calls."""

    response_id: str
    reply_to_seq: int
    model: str
    provider: str
    started_at: datetime
    text: str = ""
    tokens: int = 0
    tool_calls: list[ToolCallState] = field(default_factory=list)

    def waiting_call(self) -> ToolCallState | None:
        """The call this response waits on for a person's decision, or whose denial is
        recorded but not yet told to the model (the response can go on from the log)."""
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and not last.done and last.approval in ("waiting", "denied"):
            return last
        return None


@dataclass(frozen=True)
class Outcome:
    """How a finished response ended, kept for idempotent re-sends."""

    response_id: str
    status: str
    seq: int
    text: str


class ChatSession(Aggregate):
    """One chat: its owner, settings, conversation, and the response in progress."""

    class Event(Aggregate.Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, ChatSession)
            self.apply_to(aggregate)

        def apply_to(self, chat: ChatSession) -> None:
            pass

    class Started(Aggregate.Created):
        owner: str
        title: str
        model: str | None
        system_prompt: str | None
        max_tokens: int | None

        #: Version 1 had no ``max_tokens``: such events are read with None.
        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, object]) -> None:
            state["max_tokens"] = None

    class Renamed(Event):
        title: str

        def apply_to(self, chat: ChatSession) -> None:
            chat.title = self.title

    class ModelChanged(Event):
        #: None: the server's default model.
        model: str | None

        def apply_to(self, chat: ChatSession) -> None:
            chat.model = self.model

    class SystemPromptChanged(Event):
        system_prompt: str | None

        def apply_to(self, chat: ChatSession) -> None:
            chat.system_prompt = self.system_prompt

    class Deleted(Event):
        """The chat was deleted by ``deleted_by`` (at the event's timestamp). Stored without
        the chat's own key (``app.events.keys``), so that it stays readable once that key is
        destroyed; the chat takes nothing more."""

        deleted_by: str

        def apply_to(self, chat: ChatSession) -> None:
            chat.deleted = True
            chat.pending.clear()

    class MessageReceived(Event):
        text: str
        client_message_id: str | None
        #: The model this message is to be answered by; None: the chat's.
        model: str | None = None
        #: The message it follows (None: a first message); ``tree.LINE`` for messages
        #: recorded before messages had parents: the chat's leaf at that point.
        parent_seq: int | None = LINE
        #: The user message this one edits (an alternative to it), or None.
        edit_of: int | None = None

        #: Version 1 had no ``model``, version 2 no ``parent_seq`` nor ``edit_of``.
        class_version = 3

        @staticmethod
        def upcast_v1_v2(state: dict[str, object]) -> None:
            state["model"] = None

        @staticmethod
        def upcast_v2_v3(state: dict[str, object]) -> None:
            state["parent_seq"] = LINE
            state["edit_of"] = None

        def apply_to(self, chat: ChatSession) -> None:
            seq = self.originator_version
            if chat.message_count == 0 and chat.title == DEFAULT_TITLE:
                # a chat created without a title is titled by its first message (the views
                # derive the same title from the same event)
                chat.title = auto_title(self.text)
            parent = chat.leaf if self.parent_seq == LINE else self.parent_seq
            node: MessageNode = {"seq": seq, "role": "user", "parent": parent,
                                 "content": self.text}
            if self.model is not None:
                node["model"] = self.model
            chat.messages.append(node)
            chat.leaf = seq
            if self.client_message_id is not None:
                chat.client_message_ids[self.client_message_id] = seq
            chat.pending.append(seq)
            chat.message_count += 1

    class Regenerated(Event):
        """User message ``message_seq`` is to be answered again (its reply ``reply_seq``
        gets a new sibling); the branch through that message becomes the active one."""

        message_seq: int
        reply_seq: int
        client_message_id: str | None

        def apply_to(self, chat: ChatSession) -> None:
            seq = self.originator_version
            chat.leaf = self.message_seq
            chat.requests[str(seq)] = self.message_seq
            if self.client_message_id is not None:
                chat.client_message_ids[self.client_message_id] = seq
            chat.pending.append(seq)

    class BranchSelected(Event):
        """The branch through message ``seq`` became the active one, ending at ``leaf_seq``."""

        seq: int
        leaf_seq: int

        def apply_to(self, chat: ChatSession) -> None:
            chat.leaf = self.leaf_seq

    class Forked(Event):
        """This chat began as a copy of ``chat_id``'s active branch at event ``seq``, whose
        audit chain hash there was ``hash`` (hex); its ``MessageCopied`` events follow."""

        chat_id: str
        seq: int
        hash: str

        def apply_to(self, chat: ChatSession) -> None:
            chat.forked_from = {"chat_id": self.chat_id, "seq": self.seq, "hash": self.hash}

    class MessageCopied(Event):
        """A message of the chat this one was forked from, appended to the active branch."""

        role: str
        text: str
        #: The source message's ``seq`` (and ``model``, when it named one).
        source: dict[str, object]

        def apply_to(self, chat: ChatSession) -> None:
            node: MessageNode = {"seq": self.originator_version, "role": self.role,
                                 "parent": chat.leaf, "content": self.text}
            if isinstance(self.source.get("model"), str):
                node["model"] = str(self.source["model"])
            chat.messages.append(node)
            chat.leaf = node["seq"]
            chat.message_count += 1

    class ResponseStarted(Event):
        response_id: str
        reply_to_seq: int
        model: str
        provider: str

        def apply_to(self, chat: ChatSession) -> None:
            seq = self.originator_version
            request = next(p for p in chat.pending if chat.answers(p) == self.reply_to_seq)
            chat.pending.remove(request)
            chat.replies[str(request)] = self.response_id
            chat.messages.append({"seq": seq, "role": "assistant",
                                  "parent": self.reply_to_seq, "content": ""})
            if chat.leaf == self.reply_to_seq:
                chat.leaf = seq
            chat.current = ActiveResponse(
                response_id=self.response_id,
                reply_to_seq=self.reply_to_seq,
                model=self.model,
                provider=self.provider,
                started_at=self.timestamp,
            )

    class TokensGenerated(Event):
        response_id: str
        text: str
        offset: int
        tokens: int
        #: The chunks the text was streamed in: ``[code points, ms since the reply began]``
        #: each, so that a replay keeps the pacing. Version 1 had none: read as None.
        chunks: list[list[int]] | None

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, object]) -> None:
            state["chunks"] = None

        def apply_to(self, chat: ChatSession) -> None:
            assert chat.current is not None
            chat.current.text += self.text
            chat.current.tokens += self.tokens

    class ToolInvoked(Event):
        response_id: str
        call_id: str
        tool: str
        arguments: object

        def apply_to(self, chat: ChatSession) -> None:
            assert chat.current is not None
            chat.current.tool_calls.append(ToolCallState(self.call_id, self.tool, self.arguments))

    class ToolCompleted(Event):
        response_id: str
        call_id: str
        result: object
        duration_ms: float

        def apply_to(self, chat: ChatSession) -> None:
            call = chat.tool_call(self.call_id)
            call.result, call.duration_ms, call.done = self.result, self.duration_ms, True

    class ToolFailed(Event):
        response_id: str
        call_id: str
        error: str
        duration_ms: float

        def apply_to(self, chat: ChatSession) -> None:
            call = chat.tool_call(self.call_id)
            call.error, call.duration_ms, call.done = self.error, self.duration_ms, True

    class ToolApprovalRequested(Event):
        """The call ``call_id`` waits for a person's decision before its tool runs."""

        response_id: str
        call_id: str
        tool: str
        arguments: object

        def apply_to(self, chat: ChatSession) -> None:
            call = chat.tool_call(self.call_id)
            call.approval, call.requested_at = "waiting", self.timestamp

    class ToolDecided(Event):
        """A person (``decided_by``), or the timeout, approved or denied the call."""

        response_id: str
        call_id: str
        approve: bool
        reason: str | None
        decided_by: str

        def apply_to(self, chat: ChatSession) -> None:
            chat.decided = {**(chat.decided or {}), self.call_id: self.approve}
            if chat.current is not None and chat.current.response_id == self.response_id:
                call = chat.tool_call(self.call_id)
                call.approval = "approved" if self.approve else "denied"
                call.reason = self.reason

    class ResponseEnded(Event):
        """Base of the four ways a response ends; never recorded itself."""

        response_id: str

        def apply_to(self, chat: ChatSession) -> None:
            assert chat.current is not None
            text = chat.current.text
            reply_to = chat.current.reply_to_seq
            reply = next((n for n in reversed(chat.messages)
                          if n["role"] == "assistant" and n["parent"] == reply_to), None)
            if reply is None:  # started before a snapshot of version 1 (no tree yet)
                reply = {"seq": self.originator_version, "role": "assistant",
                         "parent": reply_to, "content": ""}
                chat.messages.append(reply)
            reply["content"] = text
            chat.outcomes[self.response_id] = Outcome(
                self.response_id,
                ending_status(self),
                self.originator_version,
                text,
            )
            chat.current = None
            chat.message_count += 1

    class ResponseCompleted(ResponseEnded):
        model: str
        finish_reason: str
        usage: ResponseUsage
        timing: ResponseTiming

    class ResponseFailed(ResponseEnded):
        error: dict[str, str]
        usage: ResponseUsage
        timing: ResponseTiming

    class ResponseStopped(ResponseEnded):
        usage: ResponseUsage
        timing: ResponseTiming

    class ResponseInterrupted(ResponseEnded):
        reason: str

    #: Terminal event classes, for ``isinstance`` checks by readers.
    ENDINGS: ClassVar[tuple[type[Aggregate.Event], ...]] = ()

    #: Set by ``Forked``: ``{"chat_id", "seq", "hash"}`` of the chat this one copies.
    forked_from: dict[str, object] | None = None

    #: Version 1 (snapshots) kept the active line only, as ``history``.
    class_version = 2
    #: Set on a chat read from a snapshot of version 1: ``ChatApplication.get_chat`` reads
    #: it again from its events (that snapshot numbers replies by their ending event).
    from_line_snapshot: bool = False

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        """A snapshot of a chat from before the tree: its one line (read again from the
        events by the application: ``from_line_snapshot``)."""
        nodes: list[MessageNode] = []
        for entry in state.pop("history", []):
            node: MessageNode = {"seq": entry["seq"], "role": entry["role"],
                                 "parent": nodes[-1]["seq"] if nodes else None,
                                 "content": entry["content"]}
            if "model" in entry:
                node["model"] = entry["model"]
            nodes.append(node)
        state.update(messages=nodes, leaf=nodes[-1]["seq"] if nodes else None, requests={},
                     from_line_snapshot=True)

    #: Chats (and snapshots) recorded before chats had a ``max_tokens`` read it as None.
    max_tokens: int | None = None
    #: Set by ``Deleted`` (chats and snapshots from before it read it as False).
    deleted: bool = False
    #: Tool calls decided (call id -> approved), so that a late decision is told it came
    #: too late even after its response ended (None: none yet, as older chats read it).
    decided: dict[str, bool] | None = None

    def __init__(
        self, owner: str, title: str, model: str | None, system_prompt: str | None,
        max_tokens: int | None = None,
    ) -> None:
        self.owner = owner
        self.title = title
        self.model = model
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        #: Every message of every branch, in the order they were recorded.
        self.messages: list[MessageNode] = []
        #: The last message of the active branch (None: no message yet).
        self.leaf: int | None = None
        #: seq of a ``Regenerated`` (as str) -> the user message it answers again
        self.requests: dict[str, int] = {}
        self.client_message_ids: dict[str, int] = {}
        #: What waits for an answer, oldest first: the seqs of user messages and of
        #: ``Regenerated`` events (``answers`` gives the message each one answers).
        self.pending: list[int] = []
        #: user message seq (as str: JSON object keys) -> id of the response answering it
        self.replies: dict[str, str] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.current: ActiveResponse | None = None
        self.message_count = 0

    @classmethod
    def start(
        cls,
        owner: str,
        title: str = "New chat",
        model: str | None = None,
        system_prompt: str | None = None,
        chat_id: UUID | None = None,
        max_tokens: int | None = None,
    ) -> ChatSession:
        """A new chat. Raises ``InvalidTextError`` for a text that is never stored, and
        ``ChatRuleError`` for a ``max_tokens`` below 1."""
        check_text(owner, "owner")
        check_text(title, "title")
        if model is not None:
            check_text(model, "model")
        if system_prompt is not None:
            check_text(system_prompt, "system_prompt")
        if max_tokens is not None and max_tokens < 1:
            raise ChatRuleError("max_tokens must be at least 1")
        return cls._create(
            cls.Started,
            id=chat_id or uuid4(),
            owner=owner,
            title=title.strip() or DEFAULT_TITLE,
            model=model,
            system_prompt=system_prompt,
            max_tokens=max_tokens,
        )

    # -- commands -------------------------------------------------------------------------

    def rename(self, title: str) -> None:
        self._require_present()
        title = check_text(title, "title").strip()
        if not title:
            raise EmptyTitleError("a title cannot be empty")
        if title != self.title:
            self.trigger_event(self.Renamed, title=title[:200])

    def receive_message(
        self, text: str, client_message_id: str | None = None, max_chars: int = 32_000,
        model: str | None = None, edit_of: int | None = None,
    ) -> int:
        """Records a user message and returns its seq; ``model`` answers it instead of the
        chat's. It follows the active branch's leaf, or, with ``edit_of``, it is a new
        alternative to that user message (its sibling), and its branch becomes the active
        one. The first message of a chat that has no title of its own (``New chat``)
        titles it too: its first line, at most ``AUTO_TITLE_CHARS`` characters (see
        ``MessageReceived``).

        Raises ``DuplicateMessageError`` (carrying the original seq) for a
        ``client_message_id`` already accepted, ``MessageNotFoundError`` for an
        ``edit_of`` that is no user message, ``ResponseInProgressError`` for one still
        waiting for its answer, and the rule errors for bad text.
        """
        self._check_request(client_message_id)
        self.check_message(text, max_chars)
        if model is not None:
            check_text(model, "model")
        parent = self.leaf
        if edit_of is not None:
            self._require_answered(edit_of)
            parent = self.tree().parent[edit_of]
        self.trigger_event(self.MessageReceived, text=text, client_message_id=client_message_id,
                           model=model, parent_seq=parent, edit_of=edit_of)
        return self.version

    def regenerate(self, reply_seq: int | None = None,
                   client_message_id: str | None = None) -> int:
        """Asks for a new answer to the user message that reply ``reply_seq`` (default: the
        active branch's last reply) answers, as a new sibling of that reply; returns the
        request's seq (what ``ack`` carries). Raises ``DuplicateMessageError``,
        ``MessageNotFoundError`` (no such reply) or ``ResponseInProgressError`` (that
        message waits for an answer already)."""
        self._check_request(client_message_id)
        tree = self.tree()
        if reply_seq is None:
            reply_seq = tree.last_reply(self.leaf)
        node = tree.nodes.get(reply_seq) if reply_seq is not None else None
        if node is None or node.role != "assistant" or node.parent is None:
            raise MessageNotFoundError("there is no such reply to regenerate")
        self._require_answered(node.parent)
        self.trigger_event(self.Regenerated, message_seq=node.parent, reply_seq=node.seq,
                           client_message_id=client_message_id)
        return self.version

    def select_branch(self, seq: int) -> int:
        """Makes the branch through message ``seq`` the active one (its newest deepest
        descendant becomes the leaf); returns the leaf. Recorded only if it changes.
        Raises ``MessageNotFoundError`` and, while anything waits for an answer or is being
        answered, ``ResponseInProgressError``."""
        self._require_present()
        tree = self.tree()
        if seq not in tree.nodes:
            raise MessageNotFoundError(f"message {seq} is not in this chat")
        if self.pending or self.current is not None:
            raise ResponseInProgressError("wait for the response to end to switch branches")
        leaf = tree.deepest(seq)
        if leaf != self.leaf:
            self.trigger_event(self.BranchSelected, seq=seq, leaf_seq=leaf)
        return leaf

    def fork_from(self, chat: ChatSession, hash_hex: str) -> None:
        """Copies ``chat``'s active branch (that chat as loaded: as it was at some seq)
        into this new chat, recording where it came from."""
        self._require_present()
        if self.messages:
            raise ChatRuleError("only a new chat can be forked into")
        self.trigger_event(self.Forked, chat_id=str(chat.id), seq=chat.version, hash=hash_hex)
        nodes = {n["seq"]: n for n in chat.messages}
        for seq in chat.tree().path(chat.leaf):
            node = nodes[seq]
            if node["role"] == "assistant" and not chat.is_finished(seq):
                continue  # still streaming at that seq
            source: dict[str, object] = {"seq": seq}
            if "model" in node:
                source["model"] = node["model"]
            self.trigger_event(self.MessageCopied, role=node["role"], text=node["content"],
                               source=source)

    def _check_request(self, client_message_id: str | None) -> None:
        if client_message_id is not None:
            check_text(client_message_id, "client_message_id")
        self._require_present()
        if client_message_id is not None and client_message_id in self.client_message_ids:
            raise DuplicateMessageError(
                client_message_id, self.client_message_ids[client_message_id]
            )

    def _require_answered(self, seq: int) -> None:
        node = self.tree().nodes.get(seq)
        if node is None or node.role != "user":
            raise MessageNotFoundError(f"message {seq} is no user message of this chat")
        waiting = {self.answers(p) for p in self.pending}
        if seq in waiting or (self.current is not None and self.current.reply_to_seq == seq):
            raise ResponseInProgressError(f"message {seq} is still waiting for its answer")

    @staticmethod
    def check_message(text: str, max_chars: int = 32_000) -> None:
        """The rules of a user message's text, for callers that check before sending:
        raises ``InvalidTextError``, ``EmptyMessageError`` or ``MessageTooLongError``."""
        check_text(text, "message")
        if not text.strip():
            raise EmptyMessageError("a message cannot be empty")
        if len(text) > max_chars:
            raise MessageTooLongError(f"a message is limited to {max_chars} characters")

    def start_response(self, model: str, provider: str, response_id: str | None = None) -> str:
        """Starts answering the oldest waiting user message; returns the response id."""
        self._require_present()
        if self.current is not None:
            raise ResponseInProgressError("a response is already being generated")
        if not self.pending:
            raise NoMessageWaitingError("no user message is waiting for an answer")
        response_id = response_id or uuid4().hex
        self.trigger_event(
            self.ResponseStarted,
            response_id=response_id,
            reply_to_seq=self.answers(self.pending[0]),
            model=model,
            provider=provider,
        )
        return response_id

    def record_tokens(
        self, response_id: str, text: str, tokens: int,
        chunks: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        current = self._require_current(response_id)
        if text:
            self.trigger_event(
                self.TokensGenerated,
                response_id=response_id,
                text=clean_text(text),
                offset=len(current.text),
                tokens=tokens,
                chunks=None if chunks is None else [[size, at] for size, at in chunks],
            )

    def invoke_tool(
        self, response_id: str, call_id: str, tool: str, arguments: object
    ) -> None:
        self._require_current(response_id)
        self.trigger_event(
            self.ToolInvoked,
            response_id=response_id,
            call_id=clean_text(call_id),
            tool=clean_text(tool),
            arguments=clean_json(arguments),
        )

    def request_tool_approval(self, response_id: str, call_id: str) -> None:
        """Makes the invoked call ``call_id`` wait for a person's decision."""
        self._require_open_call(response_id, call_id)
        call = self.tool_call(call_id)
        self.trigger_event(self.ToolApprovalRequested, response_id=response_id,
                           call_id=call_id, tool=call.tool, arguments=call.arguments)

    def decide_tool(self, call_id: str, approve: bool, reason: str | None,
                    decided_by: str) -> int:
        """Records the decision on a waiting call and returns its seq. The first decision
        wins: raises ``AlreadyDecidedError`` for a call decided before, and
        ``ToolCallNotFoundError`` for one that does not wait for a decision."""
        self._require_present()
        check_text(call_id, "call_id")
        if reason is not None:
            check_text(reason, "reason")
        if call_id in (self.decided or {}):
            raise AlreadyDecidedError(f"tool call {call_id} was already decided")
        current = self.current
        call = next((c for c in current.tool_calls if c.call_id == call_id), None) \
            if current is not None else None
        if current is None or call is None or call.approval != "waiting":
            raise ToolCallNotFoundError(f"no tool call {call_id} waits for a decision")
        self.trigger_event(self.ToolDecided, response_id=current.response_id, call_id=call_id,
                           approve=approve, reason=reason, decided_by=decided_by)
        return self.version

    def complete_tool(
        self, response_id: str, call_id: str, result: object, duration_ms: float
    ) -> None:
        self._require_open_call(response_id, call_id)
        self.trigger_event(
            self.ToolCompleted,
            response_id=response_id,
            call_id=call_id,
            result=clean_json(result),
            duration_ms=duration_ms,
        )

    def fail_tool(self, response_id: str, call_id: str, error: str, duration_ms: float) -> None:
        self._require_open_call(response_id, call_id)
        self.trigger_event(
            self.ToolFailed,
            response_id=response_id,
            call_id=call_id,
            error=clean_text(error),
            duration_ms=duration_ms,
        )

    def complete_response(
        self,
        response_id: str,
        model: str,
        finish_reason: str,
        usage: Measured,
        timing: Measured,
    ) -> None:
        self._require_current(response_id)
        self.trigger_event(
            self.ResponseCompleted,
            response_id=response_id,
            model=clean_text(model),
            finish_reason=clean_text(finish_reason),
            usage=clean_json(usage),
            timing=clean_json(timing),
        )

    def fail_response(
        self, response_id: str, error: dict[str, str], usage: Measured, timing: Measured
    ) -> None:
        self._require_current(response_id)
        self.trigger_event(
            self.ResponseFailed,
            response_id=response_id,
            error=clean_json(error),
            usage=clean_json(usage),
            timing=clean_json(timing),
        )

    def stop_response(
        self, response_id: str, usage: Measured, timing: Measured
    ) -> None:
        self._require_current(response_id)
        self.trigger_event(
            self.ResponseStopped,
            response_id=response_id,
            usage=clean_json(usage),
            timing=clean_json(timing),
        )

    def interrupt_response(self, reason: str) -> str | None:
        """Ends a response left unfinished by a crash; returns its id, or None if none was."""
        if self.current is None:
            return None
        response_id = self.current.response_id
        self.trigger_event(self.ResponseInterrupted, response_id=response_id, reason=reason)
        return response_id

    # -- queries --------------------------------------------------------------------------

    def reply_to(self, seq: int) -> tuple[str | None, Outcome | None]:
        """The response answering request ``seq`` (a user message or a ``Regenerated``),
        if started, and how it ended."""
        response_id = self.replies.get(str(seq))
        return response_id, self.outcomes.get(response_id) if response_id else None

    def answers(self, request: int) -> int:
        """The user message that waiting request ``request`` asks to answer."""
        return self.requests.get(str(request), request)

    def tree(self) -> Tree:
        """Every message of the chat, as a tree."""
        return Tree(Node(n["seq"], n["role"], n["parent"]) for n in self.messages)

    @property
    def history(self) -> list[HistoryEntry]:
        """The active branch: its messages and its ended replies, in order."""
        nodes = {n["seq"]: n for n in self.messages}
        return [_entry(nodes[seq]) for seq in self.tree().path(self.leaf)
                if nodes[seq]["role"] == "user" or self.is_finished(seq)]

    def is_finished(self, seq: int) -> bool:
        """Whether reply ``seq`` has ended (its text is final)."""
        return self.current is None or seq != self._current_seq()

    def _current_seq(self) -> int | None:
        current = self.current
        if current is None:
            return None
        return next((n["seq"] for n in reversed(self.messages)
                     if n["role"] == "assistant" and n["parent"] == current.reply_to_seq), None)

    def next_model(self) -> str | None:
        """The model the oldest waiting message asked for (None: the chat's)."""
        if not self.pending:
            return None
        seq = self.answers(self.pending[0])
        node = next((m for m in reversed(self.messages) if m["seq"] == seq), None)
        return node.get("model") if node is not None else None

    def tool_call(self, call_id: str) -> ToolCallState:
        assert self.current is not None
        for call in self.current.tool_calls:
            if call.call_id == call_id:
                return call
        raise KeyError(call_id)

    def context(self, limit: int) -> list[dict[str, str]]:
        """What the model sees to answer the message being answered (or else the oldest
        waiting one): the system prompt, then at most ``limit`` turns of the branch that
        ends at that message (later queued messages wait their turn; other branches are
        not seen)."""
        upto = (
            self.current.reply_to_seq
            if self.current
            else (self.answers(self.pending[0]) if self.pending else self.leaf)
        )
        nodes = {n["seq"]: n for n in self.messages}
        branch = [nodes[seq] for seq in self.tree().path(upto)]
        turns = [
            {"role": m["role"], "content": m["content"]}
            for m in branch[-limit:]
            if m["role"] == "user" or m["content"]
        ]
        if self.system_prompt:
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    def change_model(self, model: str | None) -> None:
        """Sets the model the chat's next responses use (None: the server's default)."""
        self._require_present()
        if model is not None:
            check_text(model, "model")
        if model != self.model:
            self.trigger_event(self.ModelChanged, model=model)

    def change_system_prompt(self, system_prompt: str | None) -> None:
        self._require_present()
        if system_prompt is not None:
            check_text(system_prompt, "system_prompt")
        if system_prompt != self.system_prompt:
            self.trigger_event(self.SystemPromptChanged, system_prompt=system_prompt)

    def delete(self, deleted_by: str) -> None:
        """Records the chat's deletion; raises ``ChatDeletedError`` if it was deleted."""
        self._require_present()
        check_text(deleted_by, "deleted_by")
        self.trigger_event(self.Deleted, deleted_by=deleted_by)

    def _require_present(self) -> None:
        if self.deleted:
            raise ChatDeletedError("chat not found")

    def _require_current(self, response_id: str) -> ActiveResponse:
        self._require_present()
        if self.current is None or self.current.response_id != response_id:
            raise NoResponseInProgressError(f"response {response_id} is not in progress")
        return self.current

    def _require_open_call(self, response_id: str, call_id: str) -> None:
        self._require_current(response_id)
        try:
            call = self.tool_call(call_id)
        except KeyError:
            raise NoResponseInProgressError(f"tool call {call_id} was not invoked") from None
        if call.done:
            raise NoResponseInProgressError(f"tool call {call_id} has already ended")


def _entry(node: MessageNode) -> HistoryEntry:
    entry: HistoryEntry = {"role": node["role"], "content": node["content"], "seq": node["seq"]}
    if "model" in node:
        entry["model"] = node["model"]
    return entry


#: How each ending of a response is called (``status`` on the wire and in the views): the
#: one place that knows it.
ENDING_STATUS: dict[type[ChatSession.ResponseEnded], str] = {
    ChatSession.ResponseCompleted: "complete",
    ChatSession.ResponseFailed: "failed",
    ChatSession.ResponseStopped: "stopped",
    ChatSession.ResponseInterrupted: "interrupted",
}

ChatSession.ENDINGS = tuple(ENDING_STATUS)


def ending_status(event: ChatSession.ResponseEnded) -> str:
    """The status of the response that ``event`` ends."""
    return ENDING_STATUS[type(event)]
