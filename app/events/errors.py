"""Errors of the domain and the event store.

EventsError
├── ChatRuleError            an invariant of a chat would be broken; nothing was recorded
│   ├── InvalidTextError      a text holds a character that is never stored (NUL, lone surrogate)
│   ├── EmptyMessageError     a user message with no text
│   ├── EmptyTitleError       a chat title with no text
│   ├── MessageTooLongError
│   ├── ResponseInProgressError
│   ├── NoResponseInProgressError  no such response (or tool call) is running
│   ├── MessageNotFoundError  an edit, regenerate or branch names no message of the chat
│   ├── NoMessageWaitingError  a response was started with no user message waiting
│   ├── ToolCallNotFoundError  no tool call of that id waits for a person's decision
│   ├── AlreadyDecidedError   a decision on a tool call that was already decided
│   └── DuplicateMessageError
├── ChatNotFoundError         no such chat (or not the caller's)
│   └── ChatDeletedError      the chat was deleted (its key destroyed: its events unreadable)
└── StoreError                the store could not be read or written
    ├── StoreUnavailableError the database is unreachable
    ├── ConcurrencyError      another writer saved the chat first: reload and retry
    └── FencedError           this process no longer holds the chat's lease; nothing was written
"""

from __future__ import annotations


class EventsError(Exception):
    """Base of every error raised by ``app.events``."""


class ChatRuleError(EventsError):
    code = "invalid_request"


class InvalidTextError(ChatRuleError):
    code = "invalid_request"


class EmptyMessageError(ChatRuleError):
    code = "empty_message"


class EmptyTitleError(ChatRuleError):
    code = "empty_title"


class MessageTooLongError(ChatRuleError):
    code = "message_too_long"


class ResponseInProgressError(ChatRuleError):
    code = "response_in_progress"


class NoResponseInProgressError(ChatRuleError):
    code = "no_response_in_progress"


class MessageNotFoundError(ChatRuleError):
    """An edit, a regenerate or a branch names a message the chat does not have."""

    code = "message_not_found"


class NoMessageWaitingError(ChatRuleError):
    code = "no_message_waiting"


class ToolCallNotFoundError(ChatRuleError):
    code = "tool_call_not_found"


class AlreadyDecidedError(ChatRuleError):
    code = "already_decided"


class DuplicateMessageError(ChatRuleError):
    code = "duplicate_message"

    def __init__(self, client_message_id: str, seq: int) -> None:
        super().__init__(f"client_message_id {client_message_id!r} was accepted as seq {seq}")
        self.client_message_id = client_message_id
        self.seq = seq


class ChatNotFoundError(EventsError):
    code = "chat_not_found"


class ChatDeletedError(ChatNotFoundError):
    """The chat was deleted: to its owner, as to anyone, it no longer exists."""


class StoreError(EventsError):
    code = "store_unavailable"


class StoreUnavailableError(StoreError):
    pass


class ConcurrencyError(StoreError):
    code = "conflict"


class FencedError(StoreError):
    """A save of a chat by a process that no longer holds its lease (another process may
    have taken the chat over): nothing was written. The actor stops writing the chat."""

    code = "owner_lost"
