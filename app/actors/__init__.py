"""Trio actors: one ``SessionActor`` per chat, run and supervised by the ``ActorSystem``."""

from .errors import (
    ActorCrashedError,
    ActorError,
    ActorStoppedError,
    MailboxFullError,
    SubscriberDroppedError,
)
from .hub import Subscription
from .messages import Accepted, LiveResponse, LiveState, TokenDelta
from .system import ActorSystem

__all__ = [
    "Accepted",
    "ActorCrashedError",
    "ActorError",
    "ActorStoppedError",
    "ActorSystem",
    "LiveResponse",
    "LiveState",
    "MailboxFullError",
    "Subscription",
    "SubscriberDroppedError",
    "TokenDelta",
]
