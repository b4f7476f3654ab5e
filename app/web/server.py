"""Serving the app with Hypercorn's trio worker, and stopping it gracefully.

``serve(settings)`` binds ``settings.host:settings.port`` (port 0: any free port, reported
through ``task_status`` as ``(host, port)``) and serves until SIGINT/SIGTERM or until
``shutdown_trigger`` returns. Shutdown: new messages are refused at once, running responses
get ``grace_s`` to finish and are then interrupted (recorded, text kept), WebSocket clients
receive those last frames and a 1001 close, then the listeners close and the lifespan stops
the background tasks.

With ``settings.metrics_bind``, a second listener of its own serves the Prometheus metrics
without a token (``serve_metrics``); it closes when the running responses have ended.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ..config import Settings
from .app import create_app
from .asgi import KeepAliveMiddleware, use_json_error_responses
from .services import Services
from .users import DEFAULT_USER, ensure_default_user

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
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    grace_s: float = 10.0,
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

    async def stopping() -> None:
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            if handle_signals:
                nursery.start_soon(_wait_for_signal, done)
            if shutdown_trigger is not None:
                nursery.start_soon(_wait_for, shutdown_trigger, done)
            await done.wait()
            nursery.cancel_scope.cancel()
        services: Services | None = app.extensions.get("eventchat")
        if services is not None:
            log.info("shutting down: letting responses finish for up to %.0f s", grace_s)
            await services.drain()

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
        binds = await nursery.start(partial(hypercorn_serve, KeepAliveMiddleware(app), config,
                                            shutdown_trigger=stopping))
        if settings.metrics_bind:
            await nursery.start(serve_metrics, app.extensions["eventchat"], settings.metrics_bind)
        started(binds)


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
    await hypercorn_serve(services.metrics.asgi_app(), config,  # type: ignore[arg-type]
                          shutdown_trigger=services.disconnect.wait, task_status=task_status)


async def _wait_for(trigger: Callable[[], Awaitable[Any]], done: trio.Event) -> None:
    await trigger()
    done.set()


async def _wait_for_signal(done: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            done.set()
            return


def _host_port(bind: str) -> tuple[str, int]:
    parts = urlsplit(bind)
    return parts.hostname or "127.0.0.1", parts.port or 0


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
