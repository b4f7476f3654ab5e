"""Events the views cannot take never stop them: skipped, recorded, reported; events written
before the text rules (NUL in text) are projected with U+FFFD; on both stores."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import trio

from app.config import Settings
from app.events.domain import ChatSession
from app.events.store import EventStore
from app.projections import Views, ViewUpdater, open_views, rebuild, status

from .conftest import dump, plain_turn, save_and_wait, timing


def poisoned_chat(owner: str = "alice") -> ChatSession:
    """A chat whose reply reports more tokens than any database integer holds (as a broken
    upstream might): the domain records it, the views cannot add it up."""
    chat = ChatSession.start(owner, "poison")
    chat.receive_message("hi")
    rid = chat.start_response("offline", "offline")
    chat.record_tokens(rid, "Hello", 1)
    huge = 2**70
    chat.complete_response(rid, "offline", "stop",
                           {"prompt_tokens": huge, "completion_tokens": 1,
                            "total_tokens": huge + 1}, timing())
    return chat


def written_before_the_text_rules(owner: str = "alice") -> ChatSession:
    """A chat as the earlier version recorded it: NUL in its title, message and reply."""
    chat = ChatSession._create(ChatSession.Started, id=uuid4(), owner=owner, title="x\x00y",
                               model=None, system_prompt="be\x00brief", max_tokens=None)
    chat.trigger_event(ChatSession.MessageReceived, text="a\x00b", client_message_id="c\x00",
                       model=None)
    rid = chat.start_response("offline", "offline")
    chat.trigger_event(ChatSession.TokensGenerated, response_id=rid, text="r\x00s", offset=0,
                       tokens=1, chunks=[[3, 0]])
    chat.complete_response(rid, "offline", "stop", {"prompt_tokens": 1, "completion_tokens": 1,
                                                    "total_tokens": 2}, timing())
    return chat


async def test_an_event_the_views_cannot_take_is_skipped_and_the_rest_goes_on(
    settings: Settings, store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    good = ChatSession.start("bob", "good")
    plain_turn(good)
    after = ChatSession.start("alice", "after")
    plain_turn(after)
    position = await save_and_wait(store, views, poisoned_chat(), good, after)
    assert runner.position == position and runner.problems(10, 60) == []
    total, skipped = await views.skipped_events()
    assert total == 1 and views.skipped == 1
    assert skipped[0]["topic"].endswith("ResponseCompleted")
    assert "int" in skipped[0]["error"].lower() or "range" in skipped[0]["error"].lower()
    chats, _ = await views.list_chats("alice")
    assert {c["title"] for c in chats} == {"poison", "after"}
    poison = next(c for c in chats if c["title"] == "poison")
    assert poison["message_count"] == 2  # everything before the bad event is there
    assert (await views.list_chats("bob"))[0][0]["message_count"] == 2
    later = ChatSession.start("bob", "later")
    plain_turn(later)
    await save_and_wait(store, views, later)  # and the runner keeps following the log
    report = await trio.to_thread.run_sync(status, settings)
    assert report["skipped_events"] == 1 and report["lag"] == 0
    assert report["skipped"][0]["position"] == skipped[0]["position"]


async def test_a_rebuild_skips_the_same_events_and_builds_the_same_views(
    settings: Settings, store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    good = ChatSession.start("bob", "good")
    plain_turn(good)
    await save_and_wait(store, views, good, poisoned_chat(), written_before_the_text_rules())
    live = await trio.to_thread.run_sync(dump, views)
    await trio.to_thread.run_sync(rebuild, settings, False)
    rebuilt_views = await trio.to_thread.run_sync(open_views, settings)
    try:
        rebuilt = await trio.to_thread.run_sync(dump, rebuilt_views)
        assert (await rebuilt_views.skipped_events())[0] == 1
    finally:
        rebuilt_views.close()
    assert rebuilt == live


async def test_text_recorded_before_the_rules_is_projected_with_a_replacement(
    settings: Settings, store: EventStore, views: Views, runner: ViewUpdater
) -> None:
    old = written_before_the_text_rules()
    await save_and_wait(store, views, old)
    chats, _ = await views.list_chats("alice")
    assert chats[0]["title"] == "x\ufffdy"
    messages, _ = await views.messages("alice", old.id, 10)
    assert [m["content"] for m in messages] == ["a\ufffdb", "r\ufffds"]
    assert messages[0]["client_message_id"] == "c\ufffd"
    hits = await views.search("alice", "a", 10)
    assert hits is not None
    assert (await views.skipped_events())[0] == 0
    fresh = ChatSession.start("alice", "fresh")  # the aggregate still loads and goes on
    plain_turn(fresh)
    loaded = await store.get(old.id)
    assert loaded.history[0]["content"] == "a\x00b"
    await save_and_wait(store, views, fresh)


async def test_health_of_the_runner_reports_a_lag_and_a_stall(
    settings: Settings, store: EventStore, views: Views
) -> None:
    runner = ViewUpdater(settings.replace(projection_delay_ms=0), store, views,
                              poll_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        assert runner.problems(1, 0.1) == []
        assert runner.lag == 0
        hold: Any = trio.Event()
        release = trio.Event()

        def block() -> None:  # the views' writer is held, as by a stuck database
            with views.db.write():
                trio.from_thread.run_sync(hold.set)
                trio.from_thread.run(release.wait)

        nursery.start_soon(trio.to_thread.run_sync, block)
        await hold.wait()
        chat = ChatSession.start("alice")
        plain_turn(chat)
        await store.save(chat)
        with trio.fail_after(5):
            while not runner.problems(1, 60):  # noqa: ASYNC110 - polling a computed state
                await trio.sleep(0.01)
        assert runner.problems(1, 60) == ["the views are 6 events behind the log"]
        assert runner.problems(100, 60) == []  # behind, but not by much, nor for long
        with trio.fail_after(5):
            while not any("not advanced" in p for p in runner.problems(100, 0.2)):  # noqa: ASYNC110
                await trio.sleep(0.05)
        release.set()
        with trio.fail_after(10):
            while runner.problems(1, 0.2):  # noqa: ASYNC110 - polling a computed state
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
