"""The load: N concurrent chats of M turns each, sent straight upstream or through eventchat.

Every driver runs each chat's turns one after the other (the next message is sent when the
previous answer is done), all chats at once, and measures, per turn, the time from sending to
the first streamed text. A first *warm-up* turn per chat (which also creates the chat) is left
out of the figures; the wall clock starts once every chat is warm. A turn counts as completed
only when it ended ``complete`` with exactly the text the upstream sent.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import httpx
import openai
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from .progress import tick

#: One turn: sends message ``n`` of a chat; returns (ttft seconds, chunks, text, status).
Turn = Callable[[int], Awaitable[tuple[float | None, int, str, str]]]


@dataclass
class LoadResult:
    name: str
    chats: int
    messages: int
    expected_text: str
    turns: int = 0
    #: Upstream chunks delivered (every chunk of every turn whose whole text arrived).
    chunks: int = 0
    #: Text frames received: fewer than chunks when the server merged deltas a client had
    #: not taken yet (a busy connection).
    frames: int = 0
    wrong: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def chunks_per_turn(self) -> int:
        return len(self.expected_text.split(" ")) - 1

    def note(self, ttft: float | None, chunks: int, text: str, status: str) -> None:
        if status == "complete" and text == self.expected_text and ttft is not None:
            self.turns += 1
            self.chunks += self.chunks_per_turn
            self.frames += chunks
            self.ttft_s.append(ttft)
        else:
            self.wrong += 1
            if len(self.errors) < 5:
                self.errors.append(f"status {status}, {len(text)} characters")


async def run_load(name: str, chats: int, messages: int, expected_text: str,
                   open_chat: Callable[[], Any],
                   on_start: Callable[[], None] = lambda: None,
                   on_end: Callable[[], None] = lambda: None,
                   think_s: float = 0.0) -> LoadResult:
    """Runs ``chats`` chats at once; ``open_chat()`` is an async context manager of a Turn.

    ``on_start`` and ``on_end`` run just before the measured turns and just after the last.
    With ``think_s``, each chat waits between turns (0.5 to 1.5 times ``think_s``, seeded per
    chat), as people do: a load below capacity, where TTFT measures latency, not queueing.
    """
    result = LoadResult(name, chats, messages, expected_text)
    warm, start = trio.Semaphore(0), trio.Event()
    running, began = chats, 0.0

    async def chat(index: int) -> None:
        nonlocal running
        pause = random.Random(index)
        async with open_chat() as turn:
            await turn(0)
            warm.release()
            await start.wait()
            try:
                for n in range(1, messages + 1):
                    if think_s:
                        await trio.sleep(think_s * pause.uniform(0.5, 1.5))
                    result.note(*await turn(n))
            except (ConnectionClosed, httpx.HTTPError, openai.APIError, OSError) as exc:
                result.wrong += messages + 1 - n
                result.errors.append(f"turn {n}: {exc!r}"[:300])
            finally:
                running -= 1
                if running == 0:
                    result.wall_s = time.perf_counter() - began
                    on_end()

    async with trio.open_nursery() as ticking:
        ticking.start_soon(tick, name, lambda: result.turns + result.wrong, chats * messages)
        async with trio.open_nursery() as nursery:
            for index in range(chats):
                nursery.start_soon(chat, index)
            for _ in range(chats):
                await warm.acquire()
            on_start()
            began = time.perf_counter()
            start.set()
        ticking.cancel_scope.cancel()
    return result


# -- straight to the upstream ---------------------------------------------------------------

def direct_chats(client: openai.AsyncOpenAI, model: str) -> Callable[[], Any]:
    class Chat:
        async def __aenter__(self) -> Turn:
            return self.turn

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def turn(self, n: int) -> tuple[float | None, int, str, str]:
            sent, first, chunks, text = time.perf_counter(), None, 0, []
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"hello {n}"}],
                stream=True, stream_options={"include_usage": True})
            try:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        chunks += 1
                        text.append(chunk.choices[0].delta.content)
            finally:
                await stream.close()
            return _since(sent, first), chunks, "".join(text), "complete"

    return Chat


# -- through eventchat: WebSocket -----------------------------------------------------------

def websocket_chats(url: str, model_chat: Callable[[], Awaitable[str]] | None = None
                    ) -> Callable[[], Any]:
    """Chats over ``/ws/chat``; ``model_chat()`` may create each chat first (its id)."""

    class Chat:
        async def __aenter__(self) -> Turn:
            self.chat_id = await model_chat() if model_chat is not None else None
            self._cm = open_websocket_url(url, message_queue_size=4096,
                                          max_message_size=16 * 1024 * 1024)
            self.ws = await self._cm.__aenter__()
            return self.turn

        async def __aexit__(self, *exc: Any) -> None:
            await self._cm.__aexit__(*exc)

        async def turn(self, n: int) -> tuple[float | None, int, str, str]:
            frame: dict[str, Any] = {"event": "user_message", "message": f"hello {n}",
                                     "client_message_id": uuid4().hex}
            if self.chat_id is not None:
                frame["chat_id"] = self.chat_id
            reader = FrameReader()
            await self.ws.send_message(json.dumps(frame))
            while reader.status is None:
                self.chat_id = reader.read(json.loads(await self.ws.get_message())) or self.chat_id
            return reader.result()

    return Chat


# -- through eventchat: POST /generate, streamed --------------------------------------------

def sse_chats(client: httpx.AsyncClient) -> Callable[[], Any]:
    class Chat:
        async def __aenter__(self) -> Turn:
            self.chat_id: str | None = None
            return self.turn

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def turn(self, n: int) -> tuple[float | None, int, str, str]:
            body: dict[str, Any] = {"message": f"hello {n}", "stream": True,
                                    "client_message_id": uuid4().hex}
            if self.chat_id is not None:
                body["chat_id"] = self.chat_id
            reader = FrameReader()
            async with client.stream("POST", "/generate", json=body) as answer:
                if answer.status_code != 200:
                    return None, 0, "", f"http {answer.status_code}"
                async for line in answer.aiter_lines():
                    if line.startswith("data: "):
                        self.chat_id = reader.read(json.loads(line[6:])) or self.chat_id
            return reader.result()

    return Chat


class FrameReader:
    """Follows one turn's frames (WebSocket or SSE alike): TTFT, text, final status."""

    def __init__(self) -> None:
        self.sent = time.perf_counter()
        self.first: float | None = None
        self.frames = 0
        self.text: list[str] = []
        self.status: str | None = None

    def read(self, data: dict[str, Any]) -> str | None:
        """Takes one frame; returns the chat id an ``ack`` names."""
        event = data.get("event")
        if event == "ack":
            return str(data["chat_id"])
        if event == "ai_response" and not data["done"]:
            self.first = self.first or time.perf_counter()
            self.frames += 1
            self.text.append(data["delta"])
        elif event == "ai_response":
            self.status = data["status"]
        elif event == "error":
            self.status = f"error {data.get('code')}"
        return None

    def result(self) -> tuple[float | None, int, str, str]:
        ttft = None if self.first is None or self.status != "complete" else self.first - self.sent
        return ttft, self.frames, "".join(self.text), self.status or "no end"


def _since(sent: float, first: float | None) -> float | None:
    return None if first is None else first - sent
