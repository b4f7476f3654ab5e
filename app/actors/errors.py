"""Errors of the actor layer.

    ActorError
    ├── MailboxFullError        the chat's mailbox stayed full: back-pressure, try again later
    ├── SubscriberDroppedError  a subscriber fell too far behind and was dropped (``reason``)
    ├── ActorStoppedError       the actor system is shutting down
    └── ActorCrashedError       an actor lost its state; its supervisor restarts it from the log

Domain and store errors (``app.events.errors``) pass through the actors unchanged.
"""

from __future__ import annotations


class ActorError(Exception):
    code = "actor_error"


class MailboxFullError(ActorError):
    code = "rate_limited"


class SubscriberDroppedError(ActorError):
    code = "slow_consumer"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ActorStoppedError(ActorError):
    code = "shutting_down"


class ActorCrashedError(ActorError):
    code = "actor_crashed"
