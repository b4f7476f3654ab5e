"""The event-store application and its persistence settings.

``ChatApplication`` is an ``eventsourcing`` application: blocking, thread-safe, and the only
code that talks to the event tables. ``persistence_env`` turns our ``Settings`` into the
library's environment (SQLite file in the data dir, or PostgreSQL from the URL), so the store
is a setting and never a code path.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import JSONTranscoder, Notification, Transcoding

from ..config import Settings
from .domain import ActiveResponse, ChatSession, Outcome, ToolCallState

APPLICATION_NAME = "eventchat"


class ChatApplication(Application[UUID]):
    """Stores chat sessions; snapshots every ``snapshot_interval`` events."""

    name = APPLICATION_NAME
    snapshotting_intervals: ClassVar[dict[type[Any], int]] = {ChatSession: 200}

    def __init__(self, env: dict[str, str] | None = None, snapshot_interval: int = 200) -> None:
        # The library reads the intervals through the instance: one interval per store.
        self.snapshotting_intervals = {ChatSession: snapshot_interval}  # type: ignore[misc]
        super().__init__(env=env)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        for cls in (ActiveResponse, ToolCallState, Outcome):
            transcoder.register(DataclassAsDict(cls))

    def get_chat(self, chat_id: UUID) -> ChatSession:
        chat: Any = self.repository.get(chat_id)
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
        self._received = _topic(ChatSession.MessageReceived)
        self._endings = {_topic(cls) for cls in ChatSession.ENDINGS}
        self._topics = [self._received, _topic(ChatSession.ResponseStarted), *self._endings]
        #: chat -> waiting messages + open responses, for chats where that is not zero
        self._owed: dict[Any, int] = {}

    def scan(self, page: int = 5000) -> list[UUID]:
        while True:
            batch = self.app.recorder.select_notifications(
                self.position + 1, page, topics=self._topics
            )
            for n in batch:
                # received +1, started 0 (+1 open response, -1 waiting message), ended -1
                step = 1 if n.topic == self._received else (-1 if n.topic in self._endings else 0)
                owed = self._owed.get(n.originator_id, 0) + step
                if owed:
                    self._owed[n.originator_id] = owed
                else:
                    self._owed.pop(n.originator_id, None)
            if batch:
                self.position = batch[-1].id
            if len(batch) < page:
                return [UUID(str(chat_id)) for chat_id, owed in self._owed.items() if owed > 0]


def _topic(cls: type[Any]) -> str:
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


def persistence_env(settings: Settings) -> dict[str, str]:
    """The ``eventsourcing`` environment for ``settings``' store, cipher and compressor."""
    env: dict[str, str] = {}
    if settings.database_url:
        env.update(postgres_env(settings.database_url, settings.database_schema))
        env["POSTGRES_POOL_SIZE"] = str(settings.store_threads)
        env["POSTGRES_MAX_OVERFLOW"] = "0"
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        env["PERSISTENCE_MODULE"] = "eventsourcing.sqlite"
        env["SQLITE_DBNAME"] = str(settings.data_dir / "events.sqlite")
        env["SQLITE_LOCK_TIMEOUT"] = "10"
    if settings.cipher_key:
        env["CIPHER_TOPIC"] = "eventsourcing.cipher:AESCipher"
        env["CIPHER_KEY"] = settings.cipher_key
    if settings.compress:
        env["COMPRESSOR_TOPIC"] = "eventsourcing.compressor:ZlibCompressor"
    return env


def postgres_env(url: str, schema: str = "public") -> dict[str, str]:
    """Splits a ``postgresql://user:password@host:port/dbname`` URL into the library's keys."""
    parts = urlsplit(url)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(parts.path.lstrip("/")) or "postgres",
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
        "POSTGRES_CONNECT_TIMEOUT": "5",
    }
    if schema and schema != "public":
        env["POSTGRES_SCHEMA"] = schema
    return env
