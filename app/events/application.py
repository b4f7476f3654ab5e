"""The event-store application and its persistence settings.

``ChatApplication`` is an ``eventsourcing`` application: blocking, thread-safe, and the only
code that talks to the event tables. ``persistence_env`` turns our ``Settings`` into the
library's environment (SQLite file in the data dir, or PostgreSQL from the URL), so the store
is a setting and never a code path.

On PostgreSQL the application recorder is ``FencedRecorder``: it also creates the chat leases'
table and checks, in the transaction that inserts a chat's events, that the saving process
still holds the chat's lease (``Fence``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import JSONTranscoder, Notification, StoredEvent, Transcoding
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg.sql import SQL, Identifier

from ..config import Settings
from .domain import ActiveResponse, ChatSession, Outcome, ToolCallState
from .errors import FencedError
from .postgres import bounded_env

APPLICATION_NAME = "eventchat"
#: One row per chat ever leased: the process holding it and its epoch, bumped at every take.
LEASES_TABLE = f"{APPLICATION_NAME}_leases"


@dataclass(frozen=True, slots=True)
class Fence:
    """What a save of ``chat_id`` must prove: the chat's lease still has ``epoch``."""

    chat_id: UUID
    epoch: int


class FencedRecorder(PostgresApplicationRecorder):
    """The library's PostgreSQL recorder, with fencing.

    ``insert_events(..., fence=Fence(...))`` (``Application.save(chat, fence=...)`` passes it
    down) reads the chat's lease row ``FOR SHARE`` in the inserting transaction, before the
    events: if its epoch is not the fence's, the transaction is rolled back and
    ``FencedError`` raised (nothing written). The share lock holds until the commit, so a new
    owner's epoch bump waits for a save already past the check, and every later save of the
    old owner fails it. The leases' table is created with the events' table.
    """

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        if datastore.enable_db_functions:  # that path inserts outside a transaction of ours
            raise ValueError("fenced saves need POSTGRES_ENABLE_DB_FUNCTIONS off")
        super().__init__(datastore, events_table_name=events_table_name)
        table = SQL("{}.{}").format(Identifier(datastore.schema), Identifier(LEASES_TABLE))
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (chat_id uuid PRIMARY KEY, "
                "holder text NOT NULL, epoch bigint NOT NULL)"
            ).format(table)
        )
        self.check_fence_statement = SQL(
            "SELECT epoch FROM {} WHERE chat_id = %s FOR SHARE"
        ).format(table)

    def _insert_events(
        self,
        curs: Any,
        stored_events: Sequence[StoredEvent],
        *,
        fence: Fence | None = None,
        **kwargs: Any,
    ) -> None:
        super()._insert_events(curs, stored_events, **kwargs)
        if fence is None:
            return
        curs.execute(self.check_fence_statement, (fence.chat_id,), prepare=True)
        row = curs.fetchone()
        if row is None or row["epoch"] != fence.epoch:
            raise FencedError(f"chat {fence.chat_id} is leased by another process now")


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
        env["APPLICATION_RECORDER_TOPIC"] = f"{__name__}:{FencedRecorder.__qualname__}"
        env["POSTGRES_POOL_SIZE"] = str(settings.store_threads)
        env["POSTGRES_MAX_OVERFLOW"] = "0"
        env.update(bounded_env(settings.store_timeout_s, settings.database_schema))
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        env["PERSISTENCE_MODULE"] = "eventsourcing.sqlite"
        env["SQLITE_DBNAME"] = str(settings.data_dir / "events.sqlite")
        env["SQLITE_LOCK_TIMEOUT"] = str(max(1, math.ceil(settings.store_timeout_s)))
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
