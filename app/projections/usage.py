"""Each user's token usage per UTC day and model, read from ``view_usage``.

The rows are written by the views updater with every other view (``Rows.use``, flushed by
``Batch``), in the transaction that moves the tracked position: exactly once, and a rebuild
from the log gives the same rows. A response counts on the day its ending was recorded, for
the model it was started with (the catalog's id, not the name the server answered with).
"""

from __future__ import annotations

from typing import TypedDict

from ..storage.sql import Tx
from .batch import USAGE_COLUMNS


class DayUsage(TypedDict):
    """One user's usage of one model on one UTC day (``YYYY-MM-DD``)."""

    day: str
    model: str
    responses: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def read(tx: Tx, owner: str, since: str | None = None, model: str | None = None
         ) -> list[DayUsage]:
    """``owner``'s rows, oldest day first (then by model), from day ``since`` on, of
    ``model`` only if given."""
    where, params = "owner = ?", [owner]
    if since is not None:
        where += " AND day >= ?"
        params.append(since)
    if model is not None:
        where += " AND model = ?"
        params.append(model)
    columns = ", ".join(USAGE_COLUMNS)
    rows = tx.all(f"SELECT day, model, {columns} FROM view_usage WHERE {where}"
                  " ORDER BY day, model", params)
    return [DayUsage(day=day, model=m, responses=int(responses), prompt_tokens=int(prompt),
                     completion_tokens=int(completion), total_tokens=int(total))
            for day, m, responses, prompt, completion, total in rows]
