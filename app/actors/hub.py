"""Fan-out of a chat's live items to its subscribers, through bounded per-subscriber queues.

Publishing never waits: an item goes into each subscriber's queue at once. Streamed text that
a subscriber has not taken yet is merged: a delta that continues the last queued one is
appended to it, so a subscriber that lags (a busy connection) gets fewer, longer deltas with
the same offsets instead of falling behind. A subscriber whose queue still fills up (it does
not read at all) is dropped with a reason; it can subscribe again and catch up from the log.
So a slow subscriber never slows the actor or the other subscribers. The hub outlives
actors: a subscription survives passivation and restarts of the chat's actor.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import replace
from uuid import UUID

import trio

from .errors import SubscriberDroppedError
from .messages import LiveItem, LiveState, TokenDelta


class Subscription:
    """One follower of one chat. Iterate it for live items; ``state`` is what it joined at."""

    def __init__(self, chat_id: UUID, state: LiveState, size: int) -> None:
        self.chat_id = chat_id
        self.state = state
        self._size = size
        self._items: deque[LiveItem] = deque()
        self._ready = trio.Event()
        self.dropped: str | None = None

    def offer(self, item: LiveItem) -> bool:
        """Queues ``item``; returns False (and closes the queue) if the subscriber is too slow."""
        if self.dropped is not None:
            return False
        last = self._items[-1] if self._items else None
        if isinstance(item, TokenDelta) and isinstance(last, TokenDelta):
            if last.response_id == item.response_id and last.offset + len(last.text) == item.offset:
                self._items[-1] = replace(last, text=last.text + item.text)
                return True
        if len(self._items) >= self._size:
            self.drop("subscriber queue full: too slow to keep up")
            return False
        self._items.append(item)
        self._ready.set()
        return True

    def drop(self, reason: str) -> None:
        if self.dropped is None:
            self.dropped = reason
        self._ready.set()

    async def receive(self) -> LiveItem:
        """The next item; raises ``SubscriberDroppedError`` once a dropped queue is drained."""
        while not self._items:
            if self.dropped is not None:
                raise SubscriberDroppedError(self.dropped)
            self._ready = trio.Event()
            await self._ready.wait()
        return self._items.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> LiveItem:
        return await self.receive()


class Hub:
    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._subscribers: dict[UUID, set[Subscription]] = defaultdict(set)

    def open(self, chat_id: UUID, state: LiveState) -> Subscription:
        subscription = Subscription(chat_id, state, self.queue_size)
        self._subscribers[chat_id].add(subscription)
        return subscription

    def close(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.chat_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.chat_id]
        subscription.drop("unsubscribed")

    def publish(self, chat_id: UUID, item: LiveItem) -> None:
        for subscription in list(self._subscribers.get(chat_id, ())):
            if not subscription.offer(item):
                self._subscribers[chat_id].discard(subscription)

    def count(self, chat_id: UUID | None = None) -> int:
        if chat_id is not None:
            return len(self._subscribers.get(chat_id, ()))
        return sum(len(s) for s in self._subscribers.values())
