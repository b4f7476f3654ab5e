"""The event-store application.

``ChatApplication`` is an ``eventsourcing`` application: blocking, thread-safe, and the only
code that talks to the event tables. Its persistence (SQLite or PostgreSQL, the fenced
recorder, deadlines) is configured by ``app.storage.recorder.persistence_env``; its mapper
encrypts each chat with a key of its own (``app.events.keys``).
"""

from __future__ import annotations

from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.application import Application, project_aggregate
from eventsourcing.persistence import (
    ApplicationRecorder,
    JSONTranscoder,
    Mapper,
    Notification,
    Transcoding,
)

from ..storage.keys import KeyTable
from ..storage.recorder import APPLICATION_NAME
from ..storage.recorder import LEASES_TABLE as LEASES_TABLE  # app.actors.cluster's import
from ..storage.recorder import Fence as Fence  # app.actors.cluster's import
from .domain import ActiveResponse, ChatSession, Outcome, ToolCallState
from .keys import ChatKeys, ChatMapper


class ChatApplication(Application[UUID]):
    """Stores chat sessions; snapshots every ``snapshot_interval`` events."""

    name = APPLICATION_NAME
    snapshotting_intervals: ClassVar[dict[type[Any], int]] = {ChatSession: 200}

    def __init__(self, env: dict[str, str] | None = None, snapshot_interval: int = 200) -> None:
        # The library reads the intervals through the instance: one interval per store.
        self.snapshotting_intervals = {ChatSession: snapshot_interval}  # type: ignore[misc]
        super().__init__(env=env)

    def construct_mapper(self) -> Mapper[UUID]:
        return self.factory.mapper(transcoder=self.construct_transcoder(), mapper_class=ChatMapper)

    def construct_recorder(self) -> ApplicationRecorder:
        """The library's recorder; then the chats' keys, in its database (``keys``)."""
        recorder = super().construct_recorder()
        datastore = getattr(recorder, "datastore", None)
        self.keys = ChatKeys(KeyTable(datastore), self.env.get("CIPHER_KEY"))  # type: ignore[arg-type]
        self.keys.open()
        assert isinstance(self.mapper, ChatMapper)
        self.mapper.keys = self.keys
        return recorder

    def destroy_key(self, chat_id: UUID) -> None:
        """Destroys the chat's data key: its events can no longer be read, anywhere."""
        self.keys.destroy(chat_id)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        for cls in (ActiveResponse, ToolCallState, Outcome):
            transcoder.register(DataclassAsDict(cls))

    def get_chat(self, chat_id: UUID, version: int | None = None) -> ChatSession:
        """The chat (as it was at ``version``). One loaded from a snapshot taken before the
        message tree (which kept the active line only, replies numbered by their ending) is
        read again from all its events, so that its messages have their own seqs."""
        chat: object = self.repository.get(chat_id, version=version)
        if getattr(chat, "from_line_snapshot", False):
            events = self.repository.event_store.get(originator_id=chat_id, lte=version)
            chat = project_aggregate(None, events)
        assert isinstance(chat, ChatSession)
        return chat

    def select(self, start: int, limit: int, stop: int | None = None) -> list[Notification]:
        """Notifications (every event of every chat) from ``start`` inclusive, in log order."""
        return list(self.recorder.select_notifications(start, limit, stop=stop))

    def max_position(self) -> int:
        return self.recorder.max_notification_id() or 0


class UnfinishedChats:
    """The chats with a response left open or a user message not yet answered.

    Follows only the message and response events of the log; each ``scan()`` (blocking)
    reads what was added since the last one, so scanning again costs only the new events.
    Notification ids commit in order (the recorders serialise inserts), so nothing is
    skipped.
    """

    def __init__(self, app: ChatApplication) -> None:
        self.app = app
        self.position = 0
        #: what asks for an answer: a message, or a regenerate of one
        self._received = {_topic(ChatSession.MessageReceived), _topic(ChatSession.Regenerated)}
        self._endings = {_topic(cls) for cls in ChatSession.ENDINGS}
        self._deleted = _topic(ChatSession.Deleted)
        self._topics = [*self._received, _topic(ChatSession.ResponseStarted), *self._endings,
                        self._deleted]
        #: chat -> waiting messages + open responses, for chats where that is not zero
        self._owed: dict[UUID | str, int] = {}

    def scan(self, page: int = 5000) -> list[UUID]:
        while True:
            batch = self.app.recorder.select_notifications(
                self.position + 1, page, topics=self._topics
            )
            for n in batch:
                if n.topic == self._deleted:  # a deleted chat is answered no more
                    self._owed.pop(n.originator_id, None)
                    continue
                # received +1, started 0 (+1 open response, -1 waiting message), ended -1
                step = 1 if n.topic in self._received else (-1 if n.topic in self._endings else 0)
                owed = self._owed.get(n.originator_id, 0) + step
                if owed:
                    self._owed[n.originator_id] = owed
                else:
                    self._owed.pop(n.originator_id, None)
            if batch:
                self.position = batch[-1].id
            if len(batch) < page:
                return [UUID(str(chat_id)) for chat_id, owed in self._owed.items() if owed > 0]


def _topic(cls: type[object]) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class DataclassAsDict(Transcoding):
    """Stores a snapshot's state dataclass as its fields (shallow: values recurse)."""

    def __init__(self, cls: type[Any]) -> None:
        self.type = cls
        self.name = cls.__name__

    def encode(self, obj: Any) -> dict[str, Any]:
        return {f: getattr(obj, f) for f in obj.__dataclass_fields__}

    def decode(self, data: dict[str, Any]) -> Any:
        return self.type(**data)
