"""Errors of the read models.

    ProjectionError
    └── ViewStoreError           the views database could not be read or written
"""

from __future__ import annotations


class ProjectionError(Exception):
    """Base of every error raised by ``app.projections``."""


class ViewStoreError(ProjectionError):
    code = "store_unavailable"
