"""A deleted chat leaves the views: its rows, its search entries, and its share of the stats.

``forget_chat`` runs in the views' write transaction that projects the chat's ``Deleted``
event (``tracking``), so it commits with the tracked position. The chat's counters and
sketch buckets are subtracted from its owner's and the overall ones, so that the views
after a deletion are those a rebuild gives: a rebuild cannot read the deleted chat's events
(its key is destroyed) and counts nothing of it. Blocking (a worker thread's).
"""

from __future__ import annotations

from ..storage.sql import Tx
from .batch import ADD_BUCKET, ADD_COUNTER, SEP, chat_scope, user_scope

#: The views' tables that hold rows of a chat, by ``chat_id``.
CHAT_TABLES = ("view_messages", "view_search", "view_skipped", "view_chats")


def forget_chat(tx: Tx, chat_id: str) -> None:
    """Removes every trace of ``chat_id`` from the views (nothing when it has none)."""
    scope = chat_scope(chat_id)
    owner = tx.value("SELECT owner FROM view_chats WHERE chat_id = ?", (chat_id,))
    if owner is not None:
        _subtract(tx, scope, ("all", user_scope(owner)))
    tx.run("DELETE FROM view_counters WHERE scope = ?", (scope,))
    tx.run("DELETE FROM view_sketches WHERE scope = ? OR scope LIKE ?", (scope, f"{scope}{SEP}%"))
    for table in CHAT_TABLES:
        tx.run(f"DELETE FROM {table} WHERE chat_id = ?", (chat_id,))


def _subtract(tx: Tx, scope: str, targets: tuple[str, str]) -> None:
    """Takes the chat's counters and buckets (``scope``, and its per-model scopes) off the
    ``targets`` scopes; rows that reach zero go (a rebuild would not have made them)."""
    counters = tx.all("SELECT name, value FROM view_counters WHERE scope = ?", (scope,))
    ADD_COUNTER.write(tx, [(t, name, -value) for t in targets for name, value in counters
                           if value])
    buckets = tx.all("SELECT scope, metric, bucket, count FROM view_sketches"
                     " WHERE scope = ? OR scope LIKE ?", (scope, f"{scope}{SEP}%"))
    moved = [(t + s[len(scope):], m, b, -c) for t in targets for s, m, b, c in buckets if c]
    ADD_BUCKET.write(tx, moved)
    tx.many("DELETE FROM view_counters WHERE scope = ? AND name = ? AND value = 0",
            [(t, name) for t in targets for name, _ in counters])
    tx.many("DELETE FROM view_sketches WHERE scope = ? AND metric = ? AND bucket = ?"
            " AND count = 0", [(s, m, b) for s, m, b, _ in moved])
