"""One response, from ``ResponseStarted`` to its ending: the model call, tools and the log.

A ``Turn`` streams the model's reply and writes it ahead of showing it: its text goes to the
log in groups (``WriteAhead``: the first text at once, then at most one transaction per
``token_flush_ms``), and a group reaches the chat's followers only once its transaction has
committed (the actor's ``record`` publishes what it saved). The turn runs the tools the model
asks for (bounded rounds) and records how the response ended, with the text still waiting in
the same transaction. A turn begun while its ``ResponseStarted`` is still committing holds
its text until ``settle()``: committed then if the start was saved, dropped (nothing
recorded) if not. ``stop()`` cancels the model call, which closes the upstream request; the
turn then records ``ResponseStopped``. A model error records ``ResponseFailed`` with the
partial text kept. Cancellation from outside (shutdown, crash) leaves the response open for
``ResponseInterrupted``, with the text committed so far: exactly what its followers saw.
``abandon()`` (the chat's lease is lost, or a save was fenced) ends the turn at once with
nothing more recorded: the response stays open for the chat's next owner to end.

Each group is recorded only at the offset where the turn's previous group ended: if a save
conflicts and the reloaded chat's text for the response is not exactly what the turn
recorded, another process wrote it and the group is refused (``FencedError``), never
appended a second time.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID, uuid4

import trio

from ..config import Settings
from ..events.domain import ChatSession, ResponseTiming, ResponseUsage, ToolCallState
from ..events.errors import AlreadyDecidedError, FencedError
from ..events.text import clean_text
from ..llm.base import (
    Finish,
    ModelRequest,
    Provider,
    TextDelta,
    ToolCallRequest,
    ToolContext,
    Usage,
    assistant_tool_calls,
    estimate_tokens,
    message_texts,
)
from ..llm.errors import LLMError, ToolError
from ..llm.tools import ToolRegistry
from .writeahead import Group, Phase, WriteAhead

#: A change to a chat (its result, if any, is the caller's).
Mutation = Callable[[ChatSession], object]
#: Who denies a call no one decided on in time (``ToolDecided.decided_by``).
TIMEOUT_DECIDER = "eventchat"


class Record(Protocol):
    """Applies mutations to the chat and saves their events in one transaction (the
    actor's ``record``): raises ``FencedError`` when the chat is no longer ours to write."""

    async def __call__(self, first: Mutation, /, *more: Mutation) -> object: ...


@dataclass(frozen=True, slots=True)
class TurnPorts:
    """All a ``Turn`` may use: its chat (read only, as recorded now), ``record`` to write
    it (what ``record`` saves, it shows to the chat's followers), the model and the tools,
    and the settings it reads. The actor builds them; a test can fake every one."""

    chat_id: UUID
    chat: Callable[[], ChatSession]
    record: Record
    provider: Provider
    tools: ToolRegistry
    settings: Settings


@dataclass
class Meter:
    """Usage and timing of one response, summed over its model rounds."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    server_timings: dict[str, object] = field(default_factory=dict)

    def add_usage(self, usage: Usage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.estimated = self.estimated or usage.estimated
        self.server_timings.update(usage.server_timings)

    def usage(self) -> ResponseUsage:
        usage: ResponseUsage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.estimated:
            usage["estimated"] = True
        if self.server_timings:
            usage["server_timings"] = self.server_timings
        return usage

    def timing(self) -> ResponseTiming:
        end = time.perf_counter()
        duration = end - self.started
        ttft = None if self.first_token is None else self.first_token - self.started
        generating = end - self.first_token if self.first_token is not None else 0.0
        rate = self.completion_tokens / generating if generating > 0 else 0.0
        return {
            "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
            "duration_ms": round(duration * 1000, 3),
            "tokens_per_second": round(rate, 2),
        }


class Turn:
    def __init__(self, ports: TurnPorts, response_id: str, model: str,
                 reply_to_seq: int, settled: bool = True) -> None:
        self.ports = ports
        self.response_id = response_id
        self.model = model
        self.reply_to_seq = reply_to_seq
        self._settled = trio.Event()
        if settled:
            self._settled.set()
        self.abandoned = False
        current = ports.chat().current
        recorded = len(current.text) if current and current.response_id == response_id else 0
        #: The reply's text between the model and the log.
        self.stream = WriteAhead(ports.settings.token_flush_ms / 1000, offset=recorded,
                                 held=not settled)
        #: Set when the stream may have text to commit (new text, the start settled).
        self._wake = trio.Event()
        #: Set (and replaced) each time a commit ends: one commit at a time.
        self._commit_done = trio.Event()
        self.meter = Meter()
        self.finish_reason = "stop"
        self.stop_scope = trio.CancelScope()
        self.interrupted: str | None = None

    @property
    def provider(self) -> Provider:
        return self.ports.provider

    def stop(self) -> None:
        self.stop_scope.cancel()

    def settle(self, saved: bool) -> None:
        """The response's start is durable (``saved``): text held so far may be committed;
        or it was not saved: the turn ends without recording anything."""
        self.stream.settle(saved)
        self._settled.set()
        self._wake.set()
        if not saved:
            self.abandoned = True
            self.stop_scope.cancel()

    def abandon(self) -> None:
        """Ends the turn at once, recording nothing more (the lease is lost)."""
        self.abandoned = True
        self.stream.close()
        self.stop_scope.cancel()

    def interrupt(self, reason: str) -> None:
        """Ends the response early as interrupted (server shutdown), keeping its text; a
        response waiting for a person's decision is left open (it waits across the restart)."""
        if self.awaiting_decision:
            return
        self.interrupted = reason
        self.stop_scope.cancel()

    async def run(self, messages: list[dict[str, Any]]) -> None:
        """Generates, then records the ending; ``trio.Cancelled`` from outside propagates."""
        error: LLMError | None = None
        with self.stop_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._commit_loop)
                try:
                    await self._rounds(messages)
                except LLMError as exc:
                    error = exc
                nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):  # the start commits whatever happens
            await self._settled.wait()
        if not self.abandoned:
            await self._end(error)

    async def _rounds(self, messages: list[dict[str, Any]]) -> None:
        settings, chat = self.ports.settings, self.ports.chat()
        tools = self.ports.tools.specs()
        messages = messages + await self._resume()
        for round_number in range(settings.max_tool_rounds + 1):
            offered = tools if round_number < settings.max_tool_rounds else ()
            request = ModelRequest(messages=messages, model=chat.model, tools=offered,
                                   max_tokens=chat.max_tokens or settings.max_tokens)
            calls = await self._stream(request)
            if not calls or not offered:  # tools asked for when none were offered are ignored
                return
            await self._settled.wait()
            await self._commit(rest=True)
            messages = messages + await self._run_tools(calls)

    async def _stream(self, request: ModelRequest) -> list[ToolCallRequest]:
        """One model call. A call cut short (stop, error, crash) reports no usage: its
        tokens are then estimated, and marked so, so that every response is accounted; a
        call that failed before the model sent anything (refused, unreachable) counts 0."""
        calls: list[ToolCallRequest] = []
        streamed, usage, received = 0, None, False
        try:
            async with self.provider.stream(request) as items:
                async for item in items:
                    received = True
                    if isinstance(item, TextDelta):
                        # what the model sends is cleaned before anyone sees it: the
                        # frames and the log then hold the same text
                        cleaned = clean_text(item.text)
                        if cleaned is not item.text:  # a new delta only when one is needed
                            item = TextDelta(cleaned, item.tokens)
                        self._on_text(item)
                        streamed += item.tokens
                        if self.stream.phase is Phase.HELD:
                            # reading on would only slow the commit it waits for
                            await self._settled.wait()
                        if streamed == item.tokens:
                            # the first text is committed before the rest of a burst is
                            # read (the rest then waits for the next group)
                            await trio.lowlevel.checkpoint()
                    elif isinstance(item, ToolCallRequest):
                        calls.append(ToolCallRequest(clean_text(item.call_id),
                                                     clean_text(item.name),
                                                     clean_text(item.arguments)))
                    elif isinstance(item, Usage):
                        usage = item
                    elif isinstance(item, Finish):
                        self.finish_reason = clean_text(item.reason)
                        self.model = clean_text(item.model) if item.model else self.model
        except LLMError:
            if not received:
                usage = Usage(0, 0, estimated=True)
            raise
        finally:
            if usage is None:
                prompt = estimate_tokens(message_texts(request.messages))
                usage = Usage(prompt, streamed, estimated=True)
            self.meter.add_usage(usage)
        return calls

    def _on_text(self, delta: TextDelta) -> None:
        if not delta.text or self.abandoned:
            return
        now = time.perf_counter()
        if self.meter.first_token is None:
            self.meter.first_token = now
        self.stream.add(delta.text, delta.tokens, round((now - self.meter.started) * 1000))
        self._wake.set()

    async def _commit_loop(self) -> None:
        """Commits the waiting text as soon as its slot comes (``WriteAhead.due``)."""
        while True:
            due = self.stream.due()
            if due is None:
                await self._wake.wait()
                self._wake = trio.Event()
            elif due > trio.current_time():
                await trio.sleep_until(due)
            else:
                await self._commit()

    async def _commit(self, *then: Mutation, rest: bool = False) -> None:
        """Records the waiting text whose slot has come (``rest``: all of it) and ``then``
        mutations in one transaction; once it commits, the actor shows the text.

        The text is taken at once (no checkpoint between the decision and the take), after
        the commit in flight, if any. Shielded: text taken from the stream is always
        written, even if the turn is being cancelled (a stop, the end of the stream) while
        the commit waits for the chat's lock. A store error ends the stream (the turn fails
        with it): nothing not committed is ever shown.
        """
        with trio.CancelScope(shield=True):
            while self.stream.phase is Phase.COMMITTING:
                await self._commit_done.wait()
            group = self.stream.take(trio.current_time(), rest=rest)
            mutations: list[Mutation] = []
            if group is not None:
                mutations.append(lambda chat: self._record_text(chat, group))
            mutations.extend(then)
            if not mutations:
                return
            try:
                if await self._record(*mutations) and group is not None:
                    self.stream.committed_group(group)
            except BaseException:
                self.stream.close()
                raise
            finally:
                self._commit_done.set()
                self._commit_done = trio.Event()

    def _record_text(self, chat: ChatSession, group: Group) -> None:
        current = chat.current
        if current is None or current.response_id != self.response_id:
            raise FencedError(f"response {self.response_id} was ended by another process")
        if len(current.text) != group.offset:
            raise FencedError(f"response {self.response_id} was written by another process")
        chat.record_tokens(self.response_id, group.text, group.tokens, group.chunks)

    async def _record(self, *mutations: Mutation) -> bool:
        """Records ``mutations``; False, the turn abandoned, if the chat is not ours to write."""
        if self.abandoned:
            return False
        try:
            await self.ports.record(*mutations)
        except FencedError:
            self.abandon()
            return False
        return True

    async def _run_tools(self, calls: list[ToolCallRequest]) -> list[dict[str, Any]]:
        results = [await self._run_tool(call) for call in calls]
        return [assistant_tool_calls(calls), *results]

    async def _run_tool(self, call: ToolCallRequest) -> dict[str, Any]:
        # The recorded id is unique within the response even if a server reuses or omits ids;
        # the model gets its own id back.
        current = self.ports.chat().current
        used = {c.call_id for c in current.tool_calls} if current else set()
        used |= set(self.ports.chat().decided or ())  # a decision names its call alone
        call_id = (
            call.call_id
            if call.call_id and call.call_id not in used
            else f"call_{uuid4().hex[:12]}"
        )
        arguments = _decode_arguments(call.arguments)
        await self._record(
            lambda chat: chat.invoke_tool(self.response_id, call_id, call.name, arguments)
        )
        await trio.lowlevel.checkpoint()  # abandoned: the stop scope ends the turn here
        if call.name in self.ports.settings.approval_tools:
            await self._record(lambda chat: chat.request_tool_approval(self.response_id, call_id))
            denied = await self._await_decision(call_id)
            if denied is not None:
                return await self._denied(call.call_id or call_id, call_id, denied)
        return await self._execute(call, call_id)

    async def _execute(self, call: ToolCallRequest, call_id: str) -> dict[str, Any]:
        """Runs the invoked call ``call_id`` and records its result or its error."""
        context = ToolContext(owner=self.ports.chat().owner, chat_id=str(self.ports.chat_id),
                              call_id=call_id)
        started = time.perf_counter()
        record: Mutation
        try:
            result = await self.ports.tools.call(call.name, call.arguments, context)
        except ToolError as exc:
            duration = _ms_since(started)
            message = f"{exc.code}: {exc}"
            record = lambda chat: chat.fail_tool(self.response_id, call_id, message, duration)  # noqa: E731
            content = json.dumps({"error": message})
        else:
            duration = _ms_since(started)
            record = lambda chat: chat.complete_tool(self.response_id, call_id, result, duration)  # noqa: E731
            content = json.dumps(result, default=str)
        await self._record(record)
        return {"role": "tool", "tool_call_id": call.call_id or call_id, "content": content}

    # -- tools that need a person's approval ------------------------------------------------

    #: True while the turn waits for a decision (the response then outlives a shutdown).
    awaiting_decision = False
    #: Told ``True`` when the turn begins to wait for a decision, ``False`` when it ends:
    #: a waiting response is not generating.
    on_wait: Callable[[bool], None] | None = None
    #: Reloads the chat from the log (a decision may have been recorded by another process).
    on_refresh: Callable[[], Awaitable[None]] | None = None
    _decision: trio.Event | None = None
    _refresh = False

    def decision_recorded(self) -> None:
        """A decision on a call of this response was recorded: the waiting call reads it."""
        if self._decision is not None:
            self._decision.set()

    def refresh(self) -> None:
        """Another process wrote the chat: a waiting call reloads it and reads it again."""
        if self._decision is not None:
            self._refresh = True
            self._decision.set()

    async def _await_decision(self, call_id: str) -> str | None:
        """Waits, without holding the chat, for the decision on ``call_id``: None if
        approved, else why it was denied. With no decision within
        ``tool_approval_timeout_s`` of its request (across restarts) the call is denied
        (``timeout``), recorded with its failure. A stop cancels the wait."""
        timeout = self.ports.settings.tool_approval_timeout_s
        self.awaiting_decision = True
        if self.on_wait is not None:
            self.on_wait(True)
        try:
            while True:
                call = self.ports.chat().tool_call(call_id)
                if call.approval == "approved":
                    return None
                if call.approval == "denied":
                    return call.reason or ""
                waited = (datetime.now(UTC) - (call.requested_at or datetime.now(UTC)))
                self._decision = trio.Event()
                with trio.move_on_after(max(0.0, timeout - waited.total_seconds())) as expiry:
                    await self._decision.wait()
                if expiry.cancelled_caught:
                    await self._time_out(call_id)
                elif self._refresh and self.on_refresh is not None:
                    self._refresh = False
                    await self.on_refresh()
        finally:
            self.awaiting_decision, self._decision = False, None
            if self.on_wait is not None:
                self.on_wait(False)

    async def _time_out(self, call_id: str) -> None:
        """Denies ``call_id`` for want of a decision, unless a person decided first."""
        message = _denial("timeout")

        def deny(chat: ChatSession) -> None:
            chat.decide_tool(call_id, False, "timeout", TIMEOUT_DECIDER)
            chat.fail_tool(self.response_id, call_id, message, 0.0)

        with contextlib.suppress(AlreadyDecidedError):
            await self._record(deny)
        await trio.lowlevel.checkpoint()  # abandoned: the stop scope ends the turn here

    async def _denied(self, model_call_id: str, call_id: str, reason: str) -> dict[str, Any]:
        """The tool is not run: its denial is recorded as the call's error (unless the
        timeout recorded it already) and the model is told."""
        message = _denial(reason)
        if not self.ports.chat().tool_call(call_id).done:
            await self._record(lambda chat: chat.fail_tool(self.response_id, call_id, message, 0.0))
        return {"role": "tool", "tool_call_id": model_call_id,
                "content": json.dumps({"error": message})}

    async def _resume(self) -> list[dict[str, Any]]:
        """The tool messages of a response that waits for a decision (it was begun before
        a restart): its calls so far as the log holds them, then the waiting call's outcome
        once decided. Nothing for a response that waits for nothing."""
        current = self.ports.chat().current
        waiting = current.waiting_call() if current is not None else None
        if current is None or waiting is None:
            return []
        calls = [ToolCallRequest(c.call_id, c.tool, c.arguments if isinstance(c.arguments, str)
                                 else json.dumps(c.arguments)) for c in current.tool_calls]
        results = [_tool_message(c) for c in current.tool_calls if c.done]
        denied = await self._await_decision(waiting.call_id)
        if denied is not None:
            results.append(await self._denied(waiting.call_id, waiting.call_id, denied))
        else:
            results.append(await self._execute(calls[-1], waiting.call_id))
        return [assistant_tool_calls(calls), *results]

    async def _end(self, error: LLMError | None) -> None:
        """Records the ending; shielded so that a stop or shutdown cannot lose it."""
        rid, usage, timing = self.response_id, self.meter.usage(), self.meter.timing()
        ending: Mutation
        if self.interrupted is not None:
            reason = self.interrupted
            ending = lambda chat: chat.interrupt_response(reason)  # noqa: E731
        elif error is not None:
            detail = {"code": error.code, "message": str(error) or type(error).__name__}
            ending = lambda chat: chat.fail_response(rid, detail, usage, timing)  # noqa: E731
        elif self.stop_scope.cancelled_caught:
            ending = lambda chat: chat.stop_response(rid, usage, timing)  # noqa: E731
        else:
            model, reason = self.model, self.finish_reason
            ending = lambda chat: chat.complete_response(rid, model, reason, usage, timing)  # noqa: E731
        await self._commit(ending, rest=True)


def _decode_arguments(raw: str) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except (ValueError, RecursionError):  # kept as the model wrote it
        return raw


def _denial(reason: str) -> str:
    """The error a denied call is recorded with, and the model told."""
    return f"denied: {reason}" if reason else "denied"


def _tool_message(call: ToolCallState) -> dict[str, Any]:
    """A finished call's result as the model is given it."""
    content = {"error": call.error} if call.error is not None else call.result
    return {"role": "tool", "tool_call_id": call.call_id,
            "content": json.dumps(content, default=str)}


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
