"""Reading a chat as it was at one of its events, to fork it (blocking: worker threads).

A fork copies the active branch of a chat as it stood right after event ``at_seq`` into a new
chat (``ChatSession.fork_from``) and names where it came from with that event's audit chain
hash, so that anyone can check the copy against the original's chain.
"""

from __future__ import annotations

from uuid import UUID

from .application import ChatApplication
from .audit import chain_table, reading
from .domain import ChatSession
from .errors import ChatNotFoundError, ChatRuleError


def chat_at(app: ChatApplication, chat_id: UUID, owner: str, at_seq: int
            ) -> tuple[ChatSession, str]:
    """The chat right after event ``at_seq`` and the hex chain hash of that event.

    Raises ``ChatNotFoundError`` (missing, deleted or not ``owner``'s) and ``ChatRuleError``
    for a seq the chat does not have.
    """
    latest = app.get_chat(chat_id)
    if latest.owner != owner or latest.deleted:
        raise ChatNotFoundError("chat not found")
    if not 1 <= at_seq <= latest.version:
        raise ChatRuleError(f"at_seq must be an event of the chat (1 to {latest.version})")
    chat = app.get_chat(chat_id, version=at_seq)
    with reading(app) as curs:
        digest = chain_table(app).hashes(curs, chat_id, at_seq - 1, at_seq).get(at_seq)
    if digest is None:
        raise ChatRuleError(f"event {at_seq} has no link in the audit chain yet")
    return chat, digest.hex()
