"""Serving the app with Hypercorn's trio worker, and stopping it gracefully.

``serve(settings)`` binds ``settings.host:settings.port`` (port 0: any free port, reported
through ``task_status`` as ``(host, port)``) and serves until SIGINT/SIGTERM or until
``shutdown_trigger`` returns. Shutdown: new messages are refused at once, running responses
get ``grace_s`` (8 s) to finish and are then interrupted (recorded, text kept), WebSocket
clients receive those last frames and a 1001 close, then the listeners close and the lifespan
stops the background tasks: about 10 s at most in all. A second signal cuts the grace
period short (responses are interrupted at once); the default handlers are then back, so a
third ends the process outright.

A core task that fails (``Services.failed``) stops the server at once, without the grace
period, and ``serve`` raises ``CoreTaskFailedError``: the process must exit, not serve on
half-alive.

With ``settings.metrics_bind``, a second listener of its own serves the Prometheus metrics
without a token (``serve_metrics``); it closes when the running responses have ended.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ..config import Settings
from ..storage.users import DEFAULT_USER, ensure_default_user
from .app import create_app
from .asgi import KeepAliveMiddleware, use_json_error_responses
from .errors import CoreTaskFailedError
from .services import SHUTDOWN_GRACE_S, Services

log = logging.getLogger(__name__)

#: Seconds an idle keep-alive HTTP connection stays open.
KEEP_ALIVE_S = 30.0


def hypercorn_config(settings: Settings, keep_alive_s: float = KEEP_ALIVE_S) -> Config:
    config = Config()
    config.bind = [f"{_bracket(settings.host)}:{settings.port}"]
    config.websocket_max_message_size = settings.max_frame_bytes
    config.websocket_ping_interval = settings.ws_ping_interval_s or None
    config.keep_alive_timeout = keep_alive_s
    config.read_timeout = None
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # type: ignore[assignment]
    return config


async def serve(
    settings: Settings,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    grace_s: float = SHUTDOWN_GRACE_S,
    handle_signals: bool = True,
    freeze_startup_objects: bool = False,
    keep_alive_s: float = KEEP_ALIVE_S,
    **collaborators: Any,
) -> None:
    """Serves until a signal or ``shutdown_trigger``; see the module docstring.

    ``collaborators`` (``store``, ``views``, ``provider``, ``tools``) go to ``create_app``.
    With ``freeze_startup_objects`` (the server process), everything alive once the server
    listens (modules, the app, the stores) is moved out of the garbage collector's sight
    (``gc.freeze()``): a full collection then walks only what requests created, not
    every loaded class and function, and so does not stall every stream for tens of ms.
    ``keep_alive_s`` is how long an idle keep-alive connection stays open (tests shorten it).
    The app is served through ``KeepAliveMiddleware``, and Hypercorn's own error answers
    get JSON bodies (``use_json_error_responses``): see ``asgi.py`` for why.
    """
    token = await trio.to_thread.run_sync(ensure_default_user, settings)
    app = create_app(settings, grace_s=grace_s, **collaborators)
    config = hypercorn_config(settings, keep_alive_s)
    use_json_error_responses()

    shutdown = Shutdown()
    services: Services | None = None

    async def stopping() -> None:
        nonlocal services
        services = app.extensions.get("eventchat")  # the lifespan has started by now
        async with trio.open_nursery() as nursery:
            if services is not None:  # a core task that fails stops the server too
                nursery.start_soon(_set_after, services.failed.wait, shutdown.requested)
            await shutdown.requested.wait()
            nursery.cancel_scope.cancel()
        if services is None or services.failure is not None:
            return
        log.info("shutting down: letting responses finish for up to %.0f s", grace_s)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hurry_after, shutdown.hurried, services)
            await services.drain()
            nursery.cancel_scope.cancel()

    def started(binds: list[str]) -> None:
        host, port = _host_port(binds[0])
        if token is not None:
            url = f"http://{_bracket(host)}:{port}/?token={token}"
            print(f"Created user {DEFAULT_USER!r}; open {url}\n{token}", flush=True)
        if freeze_startup_objects:
            gc.collect()
            gc.freeze()
        task_status.started((host, port))

    async with trio.open_nursery() as nursery:

        async def serve_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn_serve(KeepAliveMiddleware(app), config, shutdown_trigger=stopping,
                                  task_status=task_status)
            nursery.cancel_scope.cancel()  # the signal watcher and the trigger are done with

        if handle_signals:
            await nursery.start(_watch_signals, shutdown)
        if shutdown_trigger is not None:
            nursery.start_soon(_set_after, shutdown_trigger, shutdown.requested)
        binds = await nursery.start(serve_http)
        if settings.metrics_bind:
            await nursery.start(serve_metrics, app.extensions["eventchat"], settings.metrics_bind)
        started(binds)
    if services is not None and services.failure is not None:
        raise CoreTaskFailedError(f"a core task failed: {_summary(services.failure)}"
                                  ) from services.failure


async def serve_metrics(
    services: Services, bind: str, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    """Serves the metrics without a token on ``bind`` (``host:port``), every path, until the
    app has drained; reports the bound addresses. A bind that fails raises (``OSError``)."""
    config = Config()
    config.bind = [bind]
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # type: ignore[assignment]
    await hypercorn_serve(services.metrics.asgi_app(), config,
                          shutdown_trigger=services.disconnect.wait, task_status=task_status)


class Shutdown:
    """What the server was asked: to stop (``requested``: a signal or the trigger), and to
    stop now (``hurried``: a second signal)."""

    def __init__(self) -> None:
        self.requested = trio.Event()
        self.hurried = trio.Event()


async def _set_after(wait: Callable[[], Awaitable[object]], event: trio.Event) -> None:
    await wait()
    event.set()


async def _hurry_after(hurried: trio.Event, services: Services) -> None:
    await hurried.wait()
    services.hurry()


async def _watch_signals(
    shutdown: Shutdown, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The first SIGINT/SIGTERM asks for a graceful stop, the second for one without grace;
    then the default handlers are back, and a third ends the process outright."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if not shutdown.requested.is_set():
                log.info("received %s: stopping gracefully (again: interrupt responses now)",
                         name)
                shutdown.requested.set()
            else:
                log.warning("received %s again: interrupting running responses now (again:"
                            " exit at once)", name)
                shutdown.hurried.set()
                return


def _summary(error: BaseException) -> str:
    """One line about a failure: its first leaf exception's type and first line."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _host_port(bind: str) -> tuple[str, int]:
    parts = urlsplit(bind)
    return parts.hostname or "127.0.0.1", parts.port or 0


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
