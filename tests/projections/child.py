"""A second process sharing the store: ``python -m tests.projections.child MODE DIR URL SCHEMA``.

``write``: saves a chat with one turn and exits.
``crash``: saves a random workload, then projects it with a runner whose last transaction
stops after writing its rows (it touches ``DIR/in-transaction`` and waits to be killed).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from app.config import Settings
from app.events.application import ChatApplication
from app.events.domain import ChatSession
from app.projections import open_views
from app.projections.batch import Batch
from app.storage.recorder import persistence_env

from .conftest import plain_turn
from .workload import make_chats, random_turn


def main(mode: str, data_dir: str, url: str, schema: str) -> None:
    settings = Settings(data_dir=Path(data_dir), database_url=url or None,
                        database_schema=schema or "public", store_threads=2)
    app = ChatApplication(env=persistence_env(settings))
    if mode == "write":
        chat = ChatSession.start(owner="other-process", title="from afar")
        plain_turn(chat, "hello from another process")
        app.save(chat)
        return
    rng = random.Random(99)
    chats = make_chats(rng, 4)
    for n in range(40):
        for chat in rng.sample(chats, 2):
            random_turn(chat, rng, n)
        app.save(*chats)
    views = open_views(settings)
    flush = Batch.flush

    def slow_flush(batch: Batch) -> None:
        flush(batch)
        if views.read_position() >= 50:  # some batches are committed; hang in this one
            (Path(data_dir) / "in-transaction").touch()
            time.sleep(60)

    Batch.flush = slow_flush  # type: ignore[method-assign, assignment]
    position = 0
    while notifications := app.select(position + 1, 25):
        position = views.apply(notifications, app.mapper)


if __name__ == "__main__":
    main(*sys.argv[1:5])
