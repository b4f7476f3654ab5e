"""Other processes: writes seen by polling, and a runner killed mid-transaction."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import trio

from app.config import Settings
from app.events.store import EventStore
from app.projections import Views, ViewUpdater, open_views, rebuild

from .conftest import dump

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def child_args(mode: str, settings: Settings) -> list[str]:
    return [sys.executable, "-m", "tests.projections.child", mode, str(settings.data_dir),
            settings.database_url or "", settings.database_schema]


async def test_runner_sees_another_process_by_polling(
    settings: Settings, store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    with trio.fail_after(30):
        await trio.run_process(child_args("write", settings), cwd=ROOT)
        # Nothing in this process nudges the runner: only its polling can see these events.
        assert await views.wait_for(await store.max_position(), timeout=20)
    [chat], _ = await views.list_chats("other-process")
    assert chat["title"] == "from afar" and chat["message_count"] == 2
    assert runner.position == await store.max_position()


async def test_runner_killed_mid_transaction_loses_and_doubles_nothing(
    settings: Settings,
) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    marker = settings.data_dir / "in-transaction"
    with trio.fail_after(40):
        process = await trio.lowlevel.open_process(child_args("crash", settings), cwd=ROOT)
        try:
            while not marker.exists():
                assert process.poll() is None, "the child ended before hanging"
                await trio.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        assert process.returncode == -signal.SIGKILL

        store = EventStore.open(settings)
        views = open_views(settings)
        try:
            position = await views.position()
            assert 50 <= position < await store.max_position()  # the killed batch rolled back
            runner = ViewUpdater(settings, store, views)
            async with trio.open_nursery() as nursery:
                await nursery.start(runner.run)
                nursery.cancel_scope.cancel()
            assert runner.position == await store.max_position()
            caught_up = await trio.to_thread.run_sync(dump, views)
        finally:
            views.close()
            store.close()
        await trio.to_thread.run_sync(lambda: rebuild(settings, progress=False))
        rebuilt = open_views(settings)
        try:
            assert await trio.to_thread.run_sync(dump, rebuilt) == caught_up
        finally:
            rebuilt.close()

