"""Errors of the read models.

    ProjectionError
    └── ViewStoreError           the views database could not be read or written (retry)
        └── ViewDataError        the database refused the values written (never retry)
"""

from __future__ import annotations


class ProjectionError(Exception):
    """Base of every error raised by ``app.projections``."""


class ViewStoreError(ProjectionError):
    code = "store_unavailable"


class ViewDataError(ViewStoreError):
    """The database refused what was written (a value out of range, a character it cannot
    hold, a broken constraint): the same write would fail again."""
