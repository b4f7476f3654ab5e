"""``eventchat replay CHAT_ID --live``: the chat printed as it streamed, with its pacing.

The clock is ``app.events.pacing``'s, the one the WebSocket replay keeps: each reply's text
comes in the chunks the model streamed, at their recorded times, and every other event at
its own time, all divided by ``speed`` (0: at once). Blocking; it never calls a model.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from .events.domain import ChatSession, ending_status
from .events.pacing import Beat, beats


def replay_live(events: Sequence[ChatSession.Event], speed: float = 1.0,
                out: TextIO = sys.stdout) -> None:
    """Prints ``events`` as the chat showed them, paced (see the module docstring)."""
    start = time.monotonic()
    tools: dict[str, str] = {}

    def wait(at_s: float) -> None:
        if speed > 0:
            time.sleep(max(0.0, start + at_s / speed - time.monotonic()))

    for beat in beats(events):
        wait(beat.at_s)
        if beat.pieces:
            for piece in beat.pieces:
                wait(piece.at_s)
                out.write(piece.text)
                out.flush()
            continue
        line = _line(beat, tools)
        if line:
            out.write(line)
            out.flush()


def _line(beat: Beat, tools: dict[str, str]) -> str | None:
    e = beat.event
    seq = e.originator_version
    if isinstance(e, ChatSession.Started):
        return f"chat {e.originator_id}: {e.title!r}\n"
    if isinstance(e, ChatSession.MessageReceived):
        edit = f" (an edit of [{e.edit_of}])" if e.edit_of is not None else ""
        return f"\n[{seq}] user{edit}: {e.text}\n"
    if isinstance(e, ChatSession.Regenerated):
        return f"\n[{seq}] regenerate: [{e.message_seq}] answered again\n"
    if isinstance(e, ChatSession.BranchSelected):
        return f"\n[{seq}] branch through [{e.seq}] selected\n"
    if isinstance(e, ChatSession.Forked):
        return f"forked from chat {e.chat_id} at seq {e.seq}\n"
    if isinstance(e, ChatSession.MessageCopied):
        return f"\n[{seq}] {e.role} (copied): {e.text}\n"
    if isinstance(e, ChatSession.ToolApprovalRequested):
        return " (waits for approval)"
    if isinstance(e, ChatSession.ToolDecided):
        verdict = "approved" if e.approve else f"denied ({e.reason or 'no reason'})"
        return f" {verdict} by {e.decided_by}"
    if isinstance(e, ChatSession.ResponseStarted):
        return f"\n[{seq}] assistant ({e.model}): "
    if isinstance(e, ChatSession.ToolInvoked):
        tools[e.call_id] = e.tool
        return f"\n  [{seq}] tool {e.tool}({json.dumps(e.arguments, ensure_ascii=False)})"
    if isinstance(e, ChatSession.ToolCompleted):
        result = json.dumps(e.result, ensure_ascii=False, default=str)
        return f" -> {result} ({e.duration_ms:g} ms)\n"
    if isinstance(e, ChatSession.ToolFailed):
        return f" !! {e.error} ({e.duration_ms:g} ms)\n"
    if isinstance(e, ChatSession.ResponseEnded):
        error = getattr(e, "error", None)
        if isinstance(error, dict):
            error = f"{error.get('code')} ({error.get('message')})"
        detail = f": {error or getattr(e, 'reason', '')}".rstrip(": ")
        return f"\n  [{seq}] {ending_status(e)}{detail}\n"
    return None
