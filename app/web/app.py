"""The app factory: one QuartTrio app per call, its collaborators wired in one place.

``create_app(settings, store=..., views=..., provider=..., tools=...)`` builds the app; the
lifespan (``before_serving``) opens what was not given, starts the views updater (which also
feeds the response metrics) and the actor system in the app's nursery, and ``after_serving`` lets
running responses finish for ``grace_s`` before interrupting them, then stops everything.
A core task that fails does not take the lifespan down with it (Hypercorn would then go on
serving without it): ``Services`` keeps the failure, and ``server.serve`` stops and raises.
"""

from __future__ import annotations

from quart import Response, request
from quart_schema import QuartSchema, hide
from quart_trio import QuartTrio

from ..config import Settings
from ..events.store import EventStore
from ..llm.base import Provider
from ..llm.tools import ToolRegistry
from ..projections.views import Views
from ..storage.users import UserStore
from ..telemetry import Telemetry
from .auth import install_auth
from .bodies import Request
from .branches import branches
from .catalog import catalog
from .errors import register_error_handlers
from .follow import follow
from .rest import rest
from .services import SHUTDOWN_GRACE_S, Services, build_services
from .ws import watch_connections, ws

#: Largest request body: a maximal message, JSON-escaped, with room to spare.
MAX_BODY_BYTES = 256 * 1024
#: The page carries its token in the address until its script removes it: never leak it in a
#: Referer, and run no script or style but its own.
CLIENT_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none';"
                               " form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def create_app(
    settings: Settings,
    *,
    store: EventStore | None = None,
    views: Views | None = None,
    provider: Provider | None = None,
    tools: ToolRegistry | None = None,
    users: UserStore | None = None,
    grace_s: float = SHUTDOWN_GRACE_S,
    telemetry: Telemetry | None = None,
) -> QuartTrio:
    app = QuartTrio(__name__)
    app.request_class = Request
    app.config.update(
        MAX_CONTENT_LENGTH=max(MAX_BODY_BYTES, settings.max_message_chars * 8),
        # our tasks stop in after_serving; never wait seconds for stragglers
        BACKGROUND_TASK_SHUTDOWN_TIMEOUT=grace_s + 5,
        JSON_SORT_KEYS=False,
        PROVIDE_AUTOMATIC_OPTIONS=True,
        # the web client's files are revalidated on each load: never a stale script after
        # an upgrade
        SEND_FILE_MAX_AGE_DEFAULT=None,
    )
    QuartSchema(
        app,
        info={"title": "eventchat", "version": "1",
              "description": "Real-time backend for AI chat apps (wire contract version 1)."},
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        swagger_ui_path=None, redoc_ui_path=None, scalar_ui_path=None,
    )
    register_error_handlers(app)
    install_auth(app, lambda: app.extensions["eventchat"].auth)
    app.register_blueprint(rest)
    app.register_blueprint(branches)
    app.register_blueprint(catalog)
    app.register_blueprint(follow)
    app.register_blueprint(ws)

    @app.get("/")
    @hide
    async def index() -> Response:
        """The web client (public, like its files under ``/static``: it brings its own token)."""
        return await app.send_static_file("index.html")

    @app.before_serving
    async def start() -> None:
        services = await build_services(
            settings, store=store, views=views, provider=provider, tools=tools, users=users,
            grace_s=grace_s, telemetry=telemetry,
        )
        try:
            await app.nursery.start(services.run)
            app.nursery.start_soon(services.keep, watch_connections, services)
        except BaseException:
            await services.close()
            raise
        app.extensions["eventchat"] = services

    @app.after_serving
    async def stop() -> None:
        services: Services | None = app.extensions.pop("eventchat", None)
        if services is not None:
            await services.close()

    @app.after_request
    async def count(response: Response) -> Response:
        if request.endpoint in ("index", "static"):  # every page and file of the client
            response.headers.update(CLIENT_HEADERS)
        services: Services | None = app.extensions.get("eventchat")
        if services is not None:
            services.metrics.http_requests.labels(str(response.status_code)).inc()
        return response

    return app
