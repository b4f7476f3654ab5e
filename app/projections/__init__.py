"""Read models built from the event log: chat lists and histories, search, and stats.

    views = open_views(settings)                    # blocking: creates tables if needed
    updater = ViewUpdater(settings, store, views)
    await nursery.start(updater.run)                # follows the log until cancelled

Every read goes through ``Views``; the updater writes each batch of events and its tracking
position in one transaction (exactly once). ``rebuild`` and ``status`` serve the CLI.
"""

from .admin import rebuild, status
from .search import register_search_tool
from .updater import ViewUpdater
from .views import Views, open_views

__all__ = [
    "ViewUpdater",
    "Views",
    "open_views",
    "rebuild",
    "register_search_tool",
    "status",
]
