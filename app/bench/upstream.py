"""A small, fast OpenAI-compatible streaming server for the benchmark, in its own process.

    python -m app.bench.upstream [--port 0] [--chunks 25]

Prints ``port <N>`` once it listens, then answers every ``POST .../chat/completions`` with
``--chunks`` content chunks (`` w0``, `` w1``, ...), a chunk carrying ``finish_reason``, a usage
chunk (``choices: []``) and ``data: [DONE]``, with no delay: the whole body goes out in one
write, precomputed per model name. A model name ``...-<chunks>x<delay>ms`` (for example
``bench-200x5ms``) streams that many chunks with that delay between them instead, to measure
the store's write rate during a long answer. Keep-alive HTTP/1.1, ``Content-Length`` bodies.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
from functools import lru_cache, partial

import trio

_MAX_HEAD = 64 * 1024
_PACED = re.compile(r"-(\d+)x(\d+(?:\.\d+)?)ms$")


def expected_text(chunks: int) -> str:
    """The text a ``chunks``-chunk answer streams."""
    return "".join(piece(i) for i in range(chunks))


def piece(i: int) -> str:
    return f" w{i}"


def pacing(model: str, default_chunks: int) -> tuple[int, float]:
    """``(chunks, delay_s)`` for a request naming ``model``."""
    match = _PACED.search(model)
    if match is None:
        return default_chunks, 0.0
    return int(match.group(1)), float(match.group(2)) / 1000


@lru_cache(maxsize=64)
def events(model: str, chunks: int) -> tuple[bytes, ...]:
    """Every SSE event of one answer, encoded, ``[DONE]`` last."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "system_fingerprint": None, "usage": None}

    def chunk(choices: list[dict[str, object]], **extra: object) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n"

    def choice(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    out = [chunk([choice({"content": piece(i)} | ({"role": "assistant"} if i == 0 else {}))])
           for i in range(chunks)]
    out.append(chunk([choice({}, "stop")]))
    usage = {"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": 10 + chunks}
    out.append(chunk([], usage=usage))
    out.append(b"data: [DONE]\n\n")
    return tuple(out)


def _head(status: str, length: int, content_type: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncache-control: no-cache\r\n"
            f"content-length: {length}\r\n\r\n").encode()


class Upstream:
    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.requests = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        async with stream:
            try:
                while True:
                    request = await self._read(stream, buffer)
                    if request is None:
                        return
                    await self._answer(stream, *request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _read(self, stream: trio.SocketStream, buffer: bytearray) -> tuple[str, bytes] | None:
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            data = await stream.receive_some(65536)
            if not data or len(buffer) > _MAX_HEAD:
                return None
            buffer.extend(data)
        head = bytes(buffer[:end]).decode("latin-1")
        del buffer[: end + 4]
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(buffer) < length:
            data = await stream.receive_some(65536)
            if not data:
                return None
            buffer.extend(data)
        body = bytes(buffer[:length])
        del buffer[:length]
        return head.split(" ", 2)[1], body

    async def _answer(self, stream: trio.SocketStream, path: str, body: bytes) -> None:
        if not path.split("?")[0].endswith("/chat/completions"):
            payload = b'{"error": {"message": "not found", "type": "invalid_request_error"}}'
            head = _head("404 Not Found", len(payload), "application/json")
            await stream.send_all(head + payload)
            return
        self.requests += 1
        model = str(json.loads(body).get("model") or "bench")
        chunks, delay = pacing(model, self.chunks)
        parts = events(model, chunks)
        head = _head("200 OK", sum(map(len, parts)), "text/event-stream")
        if not delay:
            await stream.send_all(head + b"".join(parts))
            return
        await stream.send_all(head + parts[0])
        for part in parts[1:]:
            await trio.sleep(delay)
            await stream.send_all(part)


async def serve(port: int, chunks: int) -> None:
    upstream = Upstream(chunks)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, upstream.handle, port, host="127.0.0.1", backlog=4096)
        )
        print(f"port {listeners[0].socket.getsockname()[1]}", flush=True)


def raise_open_files_limit() -> int:
    """Raises the soft limit of open files to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=25)
    args = parser.parse_args(argv)
    raise_open_files_limit()
    try:
        trio.run(serve, args.port, args.chunks)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
