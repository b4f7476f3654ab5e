"""Read models built from the event log: chat lists and histories, search, and stats.

    views = open_views(settings)                    # blocking: creates tables if needed
    runner = ProjectionRunner(settings, store, views)
    await nursery.start(runner.run)                 # follows the log until cancelled

Every read goes through ``Views``; the runner writes each batch of events and its tracking
position in one transaction (exactly once). ``rebuild`` and ``status`` serve the CLI.
"""

from .admin import rebuild, status
from .runner import ProjectionRunner
from .search import register_search_tool
from .views import Views, open_views

__all__ = [
    "ProjectionError",
    "ProjectionRunner",
    "ViewStoreError",
    "Views",
    "open_views",
    "rebuild",
    "register_search_tool",
    "status",
]
