"""HTTP/1.1 connections to the real server: idle keep-alive connections are closed on time,
an answer given before the request body arrived leaves no wedged connection, and the errors
Hypercorn answers itself carry the contract's JSON body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import h11
import trio

from app.config import Settings
from app.storage.users import add_user
from app.web.server import serve

from .conftest import START_S, STOP_S, web_settings

KEEP_ALIVE_S = 1.0
#: Slack for a shared 2-core machine; the fault being tested keeps connections open forever.
MARGIN_S = 4.0
CONNECTIONS = 50


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[str, int]]:
    """The real server with a short keep-alive timeout; yields its ``(host, port)``."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_S):
            address = await nursery.start(partial(
                serve, web_settings(settings), shutdown_trigger=stop.wait, grace_s=1.0,
                handle_signals=False, keep_alive_s=KEEP_ALIVE_S,
            ))
        try:
            yield address
        finally:
            stop.set()
            with trio.fail_after(STOP_S):
                while nursery.child_tasks:  # noqa: ASYNC110 - waiting for serve() to return
                    await trio.sleep(0.01)


def request(method: str, target: str, *extra: tuple[str, str]) -> h11.Request:
    return h11.Request(method=method, target=target, headers=[("Host", "test"), *extra])


async def answer(stream: trio.SocketStream, client: h11.Connection) -> tuple[h11.Response, bytes]:
    """The server's whole answer to the request ``client`` sent."""
    response: h11.Response | None = None
    body = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some())
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, body


async def closed_by_server(stream: trio.SocketStream) -> bool:
    """Reads until the server ends the connection (True) or sends something (False)."""
    try:
        return await stream.receive_some() == b""
    except trio.BrokenResourceError:  # reset: closed too
        return True


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((value for key, value in response.headers if key == name), None)


async def test_idle_keep_alive_connections_are_closed_after_the_timeout(
    settings: Settings,
) -> None:
    closed_after: list[float] = []

    async def idle_after_one_request(port: int) -> None:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            client = h11.Connection(h11.CLIENT)
            await stream.send_all(client.send(request("GET", "/health"))
                                  + client.send(h11.EndOfMessage()))
            response, _ = await answer(stream, client)
            assert response.status_code == 200
            assert header(response, b"connection") is None  # the server offers to keep it
            answered = trio.current_time()
            assert await closed_by_server(stream)
            closed_after.append(trio.current_time() - answered)

    async with serving(settings) as (_, port):
        with trio.fail_after(KEEP_ALIVE_S + MARGIN_S + 10):  # 10 s for the requests
            async with trio.open_nursery() as nursery:
                for _ in range(CONNECTIONS):
                    nursery.start_soon(idle_after_one_request, port)

    assert len(closed_after) == CONNECTIONS
    assert min(closed_after) >= KEEP_ALIVE_S * 0.9, "closed before the keep-alive timeout"
    assert max(closed_after) <= KEEP_ALIVE_S + MARGIN_S


async def test_an_answer_before_the_body_leaves_the_connection_usable_or_closes_it(
    settings: Settings,
) -> None:
    body = b"x" * 1000
    async with serving(settings) as (_, port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            client = h11.Connection(h11.CLIENT)
            post = request("POST", "/chat", ("Content-Type", "application/json"),
                           ("Content-Length", str(len(body))))
            await stream.send_all(client.send(post) + client.send(h11.Data(data=body[:10])))
            with trio.fail_after(10):
                response, error = await answer(stream, client)
            assert response.status_code == 401
            assert json.loads(error)["error"]["code"] == "unauthorized"

            # a slow client: the rest comes after the server has ended its answer (sent at
            # once, it can arrive before the app's last send and the request then completes)
            await trio.sleep(0.5)
            second = h11.Connection(h11.CLIENT)
            rest = body[10:] + second.send(request("GET", "/health")) + second.send(
                h11.EndOfMessage())
            with trio.fail_after(KEEP_ALIVE_S + MARGIN_S):
                if header(response, b"connection") == b"close":
                    try:
                        await stream.send_all(rest)
                    except trio.BrokenResourceError:
                        pass
                    assert await closed_by_server(stream)
                else:
                    await stream.send_all(rest)
                    health, _ = await answer(stream, second)
                    assert health.status_code == 200


async def test_requests_with_bodies_keep_the_connection(settings: Settings) -> None:
    token = await trio.to_thread.run_sync(add_user, settings, "alice")
    body = json.dumps({"title": "kept"}).encode()
    async with serving(settings) as (_, port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            client = h11.Connection(h11.CLIENT)
            for _ in range(3):
                post = request("POST", "/chat", ("Authorization", f"Bearer {token}"),
                               ("Content-Type", "application/json"),
                               ("Content-Length", str(len(body))))
                await stream.send_all(client.send(post) + client.send(h11.Data(data=body))
                                      + client.send(h11.EndOfMessage()))
                with trio.fail_after(10):
                    response, _ = await answer(stream, client)
                assert response.status_code == 201
                assert header(response, b"connection") is None
                client.start_next_cycle()


async def hypercorn_error(port: int, data: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Sends ``data`` and reads the answer to the end: status line, headers, body."""
    received = b""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            pass  # closed after its answer, before reading everything we sent
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    return status, headers, body


async def test_hypercorn_errors_have_json_bodies(settings: Settings) -> None:
    too_large = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    cases = [(b"NOT AN HTTP REQUEST\r\n\r\n", 400, "invalid_request"),
             (too_large, 431, "headers_too_large")]
    async with serving(settings) as (_, port):
        for data, status, code in cases:
            status_line, headers, body = await hypercorn_error(port, data)
            assert status_line.startswith(f"HTTP/1.1 {status} ".encode())
            assert headers[b"content-type"] == b"application/json"
            assert headers[b"connection"] == b"close"
            assert int(headers[b"content-length"]) == len(body)
            error = json.loads(body)["error"]
            assert error["code"] == code
            assert error["message"]
