"""Errors of the storage layer that no other layer defines.

    StorageError
    └── ViewStoreError           the views database could not be read or written (retry)
        └── ViewDataError        the database refused the values written (never retry)

The event store and the user store raise the events layer's ``StoreUnavailableError`` (and a
fenced save ``FencedError``), which the web layer already maps.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of the errors defined by ``app.storage``."""


class ViewStoreError(StorageError):
    code = "store_unavailable"


class ViewDataError(ViewStoreError):
    """The database refused what was written (a value out of range, a character it cannot
    hold, a broken constraint): the same write would fail again."""
